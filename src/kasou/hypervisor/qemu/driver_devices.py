"""The QEMU driver's devices that change while a guest runs: a disk grown, disks and NICs plugged in and out.
The QMP steps are in :mod:`kasou.hypervisor.qemu.hotplug`; this class holds the VM's lock around them, hands a
new disk file to the VM's user (through ``_qmp``'s ``blockdev-add``), makes and deletes a NIC's tap, and keeps
the VM's saved launch spec in step, so snapshots, backups, mirrors and a migration see the devices it has now.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from typing import Any

from kasou.errors import Conflict, KasouError, NotFound
from kasou.hypervisor.base import LaunchDisk, LaunchSpec
from kasou.hypervisor.devices import check_new, unpluggable
from kasou.hypervisor.qemu import blocknodes
from kasou.hypervisor.qemu import confine as cf
from kasou.hypervisor.qemu import hotplug as hp
from kasou.hypervisor.qemu import runfiles as rf
from kasou.hypervisor.qemu.driver_core import DriverCore, QemuVm
from kasou.hypervisor.qemu.network import tap_name
from kasou.model.spec import USER_NETWORK, NicSpec


class DeviceOps(DriverCore):
    """Grow a disk; plug disks and NICs in and out of running VMs."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._device_waits: dict[tuple[str, str], asyncio.Event] = {}

    def _device_deleted(self, vm: QemuVm, device: str) -> None:
        waiter = self._device_waits.get((vm.name, device))
        if waiter is not None:
            waiter.set()

    def _spec(self, vm: QemuVm) -> LaunchSpec:
        spec = rf.launch_spec(vm.files)
        if spec is None:
            raise NotFound(f"VM {vm.name!r} has no launch record on this host")
        return spec

    def _save_spec(self, vm: QemuVm, spec: LaunchSpec) -> None:
        data = json.loads(vm.files.launch.read_text())
        data["spec"] = spec.model_dump()
        tmp = vm.files.launch.with_suffix(".tmp")
        tmp.write_text(json.dumps(data))
        tmp.replace(vm.files.launch)

    def _port_free(self, spec: LaunchSpec, port: int | None, what: str) -> int:
        if port is None or not 1 <= port <= spec.pci_ports:
            raise Conflict(
                f"VM {spec.name!r} has no hot-plug port {port} (it has {spec.pci_ports}); "
                f"stop it and add the {what} then"
            )
        used = {d.port for d in spec.disks} | {n.port for n in spec.nics}
        if port in used:
            raise Conflict(f"hot-plug port {port} of VM {spec.name!r} is taken")
        return port

    async def _gone(self, vm: QemuVm, device: str, timeout_s: float) -> bool:
        waiter = self._device_waits.setdefault((vm.name, device), asyncio.Event())
        try:
            return await hp.wait_gone(self._exec(vm), waiter, device, timeout_s)
        finally:
            self._device_waits.pop((vm.name, device), None)

    def _gone_for(self, vm: QemuVm) -> Any:
        async def gone(device: str, timeout_s: float) -> bool:
            return await self._gone(vm, device, timeout_s)

        return gone

    # -- disks -------------------------------------------------------------------------------------

    async def grow_disk(self, name: str, disk_id: str, size_bytes: int) -> None:
        async with self._lock(name):
            vm = self._running(name)
            spec = self._spec(vm)
            if not any(d.id == disk_id for d in spec.disks):
                raise NotFound(f"VM {name!r} has no disk {disk_id}")
            top = await blocknodes.top_node(self._exec(vm), disk_id)
            await hp.grow_disk(self._exec(vm), str(top["node-name"]), size_bytes)
            spec.disks = [d.model_copy(update={"size_bytes": size_bytes}) if d.id == disk_id else d for d in spec.disks]
            self._save_spec(vm, spec)

    async def plug_disk(self, name: str, disk: LaunchDisk) -> None:
        async with self._lock(name):
            vm = self._running(name)
            spec = self._spec(vm)
            check_new(name, "disk", spec.disks, disk.id)
            self._port_free(spec, disk.port, "disk")
            if vm.identity is not None:  # its file is the VM's user's, as the disks it started with
                cf.hand_over_disk(disk.path, vm.identity, name, readonly=disk.readonly)
            await hp.add_disk(self._exec(vm), disk)
            spec.disks = [*spec.disks, disk]
            self._save_spec(vm, spec)

    async def unplug_disk(self, name: str, disk_id: str, timeout_s: float = hp.UNPLUG_TIMEOUT_S) -> None:
        async with self._lock(name):
            vm = self._running(name)
            spec = self._spec(vm)
            disk = unpluggable(name, "disk", spec.disks, disk_id)
            top = await blocknodes.top_node(self._exec(vm), disk_id)
            await hp.remove_disk(self._exec(vm), self._gone_for(vm), disk_id, str(top["node-name"]), timeout_s)
            spec.disks = [d for d in spec.disks if d.id != disk_id]
            self._save_spec(vm, spec)
            if vm.identity is not None:
                cf.give_back(disk.path)

    # -- NICs --------------------------------------------------------------------------------------

    async def plug_nic(self, name: str, nic: NicSpec) -> None:
        async with self._lock(name):
            vm = self._running(name)
            spec = self._spec(vm)
            check_new(name, "NIC", spec.nics, nic.id)
            port = self._port_free(spec, nic.port, "NIC")
            tapped = nic.network != USER_NETWORK
            fd: int | None = None
            try:
                if tapped:  # as at a start: the tap on its network's bridge first (kasou.hypervisor.qemu.network)
                    owner = None if vm.identity is None else (vm.identity.uid, vm.identity.gid)
                    await asyncio.to_thread(self.network.plug, name, [nic], owner)
                    if vm.identity is not None:  # a confined QEMU gets the tap opened for it, as at its start
                        _, fds = cf.open_taps([f"tap,id={nic.id},ifname={tap_name(name, nic.id)}"])
                        fd = fds[0]
                        await self._fd_sender(vm)(f"{nic.id}-tap", fd)
                        netdev: dict[str, Any] = {"type": "tap", "fd": f"{nic.id}-tap"}
                    else:
                        netdev = {"type": "tap", "ifname": tap_name(name, nic.id), "script": "no", "downscript": "no"}
                else:
                    netdev = {"type": "user"}
                await hp.add_nic(self._exec(vm), nic.id, nic.mac, port, netdev)
            except BaseException:
                if tapped:
                    with contextlib.suppress(KasouError):
                        await asyncio.to_thread(self.network.unplug_one, name, nic.id)
                raise
            finally:
                if fd is not None:
                    os.close(fd)
            spec.nics = [*spec.nics, nic]
            self._save_spec(vm, spec)
            if tapped:
                vm.taps = [*vm.taps, nic.id]

    async def unplug_nic(self, name: str, nic_id: str, timeout_s: float = hp.UNPLUG_TIMEOUT_S) -> None:
        async with self._lock(name):
            vm = self._running(name)
            spec = self._spec(vm)
            nic = unpluggable(name, "NIC", spec.nics, nic_id)
            await hp.remove_nic(self._exec(vm), self._gone_for(vm), nic_id, timeout_s)
            spec.nics = [n for n in spec.nics if n.id != nic_id]
            self._save_spec(vm, spec)
            if nic.network != USER_NETWORK:
                vm.taps = [t for t in vm.taps if t != nic_id]
                await asyncio.to_thread(self.network.unplug_one, name, nic_id)
