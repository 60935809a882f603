"""Devices that change while the guest runs: the QMP steps of growing a disk and of plugging disks and NICs
in and out. Plain functions over an ``execute`` (QMP); the driver holds the VM's lock around them
(:mod:`kasou.hypervisor.qemu.driver_devices`).

On q35 a device on the root bus (``pcie.0``) cannot be unplugged, and none can be plugged in there: a VM gets
``pci_ports`` empty PCIe root ports (``hp1``..``hpN``) at its start, and every disk or NIC added later sits
on one of them (``port``), on the command line of its next start and of a migration's destination too, so
both sides of a migration have the same devices at the same addresses.

Unplugging asks the guest (``device_del``) and waits for QEMU's ``DEVICE_DELETED`` (bounded): a guest that
does not let go of the device keeps it, and the caller says so.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Any

from kasou.errors import HypervisorError, MonitorError, OperationTimeout
from kasou.hypervisor.base import LaunchDisk
from kasou.hypervisor.qemu.migration import Execute

UNPLUG_TIMEOUT_S = 30.0  # a guest acknowledges an unplug request in a few seconds (pciehp waits 5 s)


def port_id(port: int) -> str:
    return f"hp{port}"


def bus_of(port: int | None) -> str:
    """The ``,bus=...`` of a device on hot-plug port ``port`` (empty on the root bus)."""
    return "" if port is None else f",bus={port_id(port)}"


def root_port_args(count: int) -> list[str]:
    """``count`` empty PCIe root ports for devices plugged in later (chassis numbers of their own)."""
    out: list[str] = []
    for n in range(1, count + 1):
        out += ["-device", f"pcie-root-port,id={port_id(n)},chassis={n + 16}"]
    return out


async def grow_disk(execute: Execute, node: str, size_bytes: int) -> None:
    """Grow the disk whose active (top) block node is ``node``; the guest sees the new size at once."""
    await execute("block_resize", {"node-name": node, "size": size_bytes})


async def add_disk(execute: Execute, disk: LaunchDisk) -> None:
    """Open ``disk`` (nodes ``D-file`` and ``D``) and plug a virtio-blk device for it into its port.

    On failure nothing is left: the device, then the nodes, are taken out again."""
    if disk.port is None:
        raise HypervisorError(f"disk {disk.id} has no hot-plug port")
    ro = disk.readonly
    added: list[str] = []
    try:
        await execute("blockdev-add", {"driver": "file", "filename": disk.path, "node-name": f"{disk.id}-file",
                                       "read-only": ro})  # fmt: skip
        added.append(f"{disk.id}-file")
        await execute("blockdev-add", {"driver": disk.format, "file": f"{disk.id}-file", "node-name": disk.id,
                                       "read-only": ro})  # fmt: skip
        added.append(disk.id)
        await execute("device_add", {"driver": "virtio-blk-pci", "drive": disk.id, "id": f"{disk.id}-dev",
                                     "bus": port_id(disk.port)})  # fmt: skip
    except BaseException:
        for node in reversed(added):
            with contextlib.suppress(MonitorError, OperationTimeout):
                await execute("blockdev-del", {"node-name": node})
        raise


async def remove_disk(execute: Execute, gone: Callable[[str, float], Awaitable[bool]], disk_id: str, top: str,
                      timeout_s: float = UNPLUG_TIMEOUT_S) -> None:  # fmt: skip
    """Unplug disk ``disk_id``'s device (the guest must let go of it within ``timeout_s``), then close its
    nodes: ``top`` (its active node now) and, for a disk opened by kasou, ``D`` and ``D-file``."""
    await unplug(execute, gone, f"{disk_id}-dev", timeout_s)
    for node in dict.fromkeys([top, disk_id, f"{disk_id}-file"]):
        try:
            await execute("blockdev-del", {"node-name": node})
        except MonitorError as e:
            if e.details.get("error_class") != "GenericError":
                raise
            # a node already gone with its parent (QEMU closes a file node no one else holds)


async def add_nic(execute: Execute, nic_id: str, mac: str, port: int, netdev: dict[str, Any]) -> None:
    """Plug a virtio-net device with MAC ``mac`` into port ``port`` on a new ``netdev``; nothing left on failure."""
    await execute("netdev_add", {"id": nic_id, **netdev})
    try:
        await execute("device_add", {"driver": "virtio-net-pci", "netdev": nic_id, "mac": mac, "id": f"{nic_id}-dev",
                                     "bus": port_id(port)})  # fmt: skip
    except BaseException:
        with contextlib.suppress(MonitorError, OperationTimeout):
            await execute("netdev_del", {"id": nic_id})
        raise


async def remove_nic(execute: Execute, gone: Callable[[str, float], Awaitable[bool]], nic_id: str,
                     timeout_s: float = UNPLUG_TIMEOUT_S) -> None:  # fmt: skip
    await unplug(execute, gone, f"{nic_id}-dev", timeout_s)
    await execute("netdev_del", {"id": nic_id})


Gone = Callable[[str, float], Awaitable[bool]]  # the driver's bounded wait for a device's DEVICE_DELETED


async def unplug(execute: Execute, gone: Gone, device: str, timeout_s: float) -> None:
    """``device_del`` and wait until QEMU says the device is deleted (``gone``: the driver's wait for
    ``DEVICE_DELETED``, bounded), else OperationTimeout naming the guest. A device already gone (a guest that let
    go after an earlier try timed out) is not asked for again; one whose unplug is still pending is waited for."""
    if not await device_present(execute, device):
        return
    try:
        await execute("device_del", {"id": device})
    except MonitorError:
        if not await device_present(execute, device):
            return
        # QEMU refuses a second device_del while the guest has not answered the first: wait for that one
    if not await gone(device, timeout_s):
        raise OperationTimeout(
            f"the guest did not release device {device} within {timeout_s:.0f} s (it still has it; a guest that "
            "is not running or has no PCIe hot-plug support cannot): try again, or stop the VM and remove it then"
        )


async def device_present(execute: Execute, device: str) -> bool:
    """Is ``device`` still among the machine's peripherals? (a ``DEVICE_DELETED`` missed while the monitor was
    being connected again is caught this way)."""
    children = await execute("qom-list", {"path": "/machine/peripheral"})
    return any(isinstance(c, dict) and c.get("name") == device for c in children or [])


async def wait_gone(execute: Execute, deleted: asyncio.Event, device: str, timeout_s: float) -> bool:
    """Wait up to ``timeout_s`` for ``deleted`` (set on ``DEVICE_DELETED``) or the device to vanish."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        left = deadline - loop.time()
        try:
            await asyncio.wait_for(deleted.wait(), min(0.5, max(left, 0.01)))
            return True
        except TimeoutError:
            pass
        if not await device_present(execute, device):
            return True
        if loop.time() >= deadline:
            return False
