"""The fake driver's devices that change while a guest runs, as QEMU's (kasou.hypervisor.qemu.driver_devices):
a disk grows for real (``qemu-img resize`` of its file), disks and NICs are plugged into free hot-plug ports,
and an unplug waits for a guest that may not let go (``unplug_hangs``)."""

from __future__ import annotations

import asyncio
from pathlib import Path

from kasou.errors import Conflict, HypervisorError, NotFound, OperationTimeout
from kasou.hypervisor.base import LaunchDisk, LaunchSpec, RuntimeInfo
from kasou.hypervisor.devices import check_new, unpluggable
from kasou.model.spec import NicSpec


class FakeDevices:
    specs: dict[str, LaunchSpec]

    fail_next_plug: str | None = None  # the error of the next plug_disk/plug_nic
    unplug_hangs: bool = False  # the guest never releases an unplugged device (as one without hot-plug support)

    def _active(self, name: str) -> RuntimeInfo:
        raise NotImplementedError

    def _running_spec(self, name: str) -> LaunchSpec:
        self._active(name)
        return self.specs[name]

    def _take_port(self, spec: LaunchSpec, port: int | None, what: str) -> None:
        if port is None or not 1 <= port <= spec.pci_ports:
            raise Conflict(
                f"VM {spec.name!r} has no hot-plug port {port} (it has {spec.pci_ports}); "
                f"stop it and add the {what} then"
            )
        if port in {d.port for d in spec.disks} | {n.port for n in spec.nics}:
            raise Conflict(f"hot-plug port {port} of VM {spec.name!r} is taken")
        if self.fail_next_plug is not None:
            msg, self.fail_next_plug = self.fail_next_plug, None
            raise HypervisorError(f"QEMU refused device_add for VM {spec.name!r}: {msg}")

    async def _unplug_wait(self, device: str, timeout_s: float) -> None:
        if self.unplug_hangs:
            await asyncio.sleep(min(timeout_s, 0.05))
            raise OperationTimeout(
                f"the guest did not release device {device} within {timeout_s:.0f} s (it still has it; a guest that "
                "is not running or has no PCIe hot-plug support cannot): try again, or stop the VM and remove it then"
            )

    async def grow_disk(self, name: str, disk_id: str, size_bytes: int) -> None:
        spec = self._running_spec(name)
        disk = next((d for d in spec.disks if d.id == disk_id), None)
        if disk is None:
            raise NotFound(f"VM {name!r} has no disk {disk_id}")
        proc = await asyncio.create_subprocess_exec(
            "qemu-img", "resize", "-q", "-f", disk.format, disk.path, str(size_bytes),
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        _, err = await asyncio.wait_for(proc.communicate(), 30)
        if proc.returncode != 0:
            raise HypervisorError(f"QEMU refused block_resize for VM {name!r}: {err.decode().strip()}")
        spec.disks = [d.model_copy(update={"size_bytes": size_bytes}) if d.id == disk_id else d for d in spec.disks]

    async def plug_disk(self, name: str, disk: LaunchDisk) -> None:
        spec = self._running_spec(name)
        check_new(name, "disk", spec.disks, disk.id)
        self._take_port(spec, disk.port, "disk")
        if not Path(disk.path).exists():
            raise HypervisorError(f"QEMU refused blockdev-add for VM {name!r}: Could not open '{disk.path}'")
        spec.disks = [*spec.disks, disk]

    async def unplug_disk(self, name: str, disk_id: str, timeout_s: float = 30.0) -> None:
        spec = self._running_spec(name)
        unpluggable(name, "disk", spec.disks, disk_id)
        await self._unplug_wait(f"{disk_id}-dev", timeout_s)
        spec.disks = [d for d in spec.disks if d.id != disk_id]

    async def plug_nic(self, name: str, nic: NicSpec) -> None:
        spec = self._running_spec(name)
        check_new(name, "NIC", spec.nics, nic.id)
        self._take_port(spec, nic.port, "NIC")
        spec.nics = [*spec.nics, nic]

    async def unplug_nic(self, name: str, nic_id: str, timeout_s: float = 30.0) -> None:
        spec = self._running_spec(name)
        unpluggable(name, "NIC", spec.nics, nic_id)
        await self._unplug_wait(f"{nic_id}-dev", timeout_s)
        spec.nics = [n for n in spec.nics if n.id != nic_id]
