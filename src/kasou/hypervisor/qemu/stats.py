"""Resource figures of the QEMU VMs on this host (see :mod:`kasou.hypervisor.stats` for what each means).

CPU and memory come from ``/proc/<pid>/stat`` of the QEMU process, disk I/O from QMP
``query-blockstats`` (matched to kasou's disk ids by the device id ``<id>-dev`` the
command line gives each virtio-blk device), network I/O from the tap devices of NICs
on named networks. A VM whose monitor is busy or gone still reports CPU and memory.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import time
from typing import Any

from kasou.errors import KasouError
from kasou.hypervisor.base import RuntimeState
from kasou.hypervisor.qemu import runfiles as rf
from kasou.hypervisor.qemu.driver_core import DriverCore, QemuVm
from kasou.hypervisor.qemu.network import tap_name
from kasou.hypervisor.stats import USER_NET_NOTE, DiskIO, NicIO, VmStats, read_net_counters, read_pid_stat

QMP_STATS_TIMEOUT = 2.0
_MEASURED = (RuntimeState.RUNNING, RuntimeState.PAUSED, RuntimeState.SHUTTING_DOWN)


def disk_id_of(entry: dict[str, Any]) -> str | None:
    """The kasou disk id of one ``query-blockstats`` entry, from its qdev path or device name."""
    qdev = str(entry.get("qdev") or "")
    for part in qdev.split("/"):
        if part.endswith("-dev"):
            return part[: -len("-dev")]
    dev = str(entry.get("device") or "")
    if dev:
        return dev[: -len("-dev")] if dev.endswith("-dev") else dev
    node = str(entry.get("node-name") or "")
    return node or None


def parse_blockstats(reply: list[dict[str, Any]]) -> list[DiskIO]:
    """QMP ``query-blockstats`` -> one :class:`DiskIO` per guest disk (entries without a device skipped)."""
    out: dict[str, DiskIO] = {}
    for entry in reply:
        disk = disk_id_of(entry)
        st = entry.get("stats") or {}
        if disk is None or not (entry.get("qdev") or entry.get("device")):
            continue
        io = out.setdefault(disk, DiskIO(id=disk))
        io.read_bytes += int(st.get("rd_bytes", 0))
        io.write_bytes += int(st.get("wr_bytes", 0))
        io.read_ops += int(st.get("rd_operations", 0))
        io.write_ops += int(st.get("wr_operations", 0))
    return sorted(out.values(), key=lambda d: d.id)


class StatsOps(DriverCore):
    """``Driver.stats`` for QEMU."""

    async def stats(self) -> builtins.list[VmStats]:
        vms = [vm for vm in list(self._vms.values()) if vm.state in _MEASURED]
        return list(await asyncio.gather(*(self._vm_stats(vm) for vm in vms)))

    async def _vm_stats(self, vm: QemuVm) -> VmStats:
        s = VmStats(name=vm.name, state=vm.state.value, taken_at=time.time())
        cpu = read_pid_stat(vm.pid)
        if cpu is not None:
            s.cpu_seconds, s.rss_bytes = cpu
        notes = []
        if vm.monitor is not None and vm.monitor.connected and vm.outgoing is None:
            try:
                reply = await vm.monitor.execute("query-blockstats", {"query-nodes": False}, timeout=QMP_STATS_TIMEOUT)
                s.disks = parse_blockstats(reply if isinstance(reply, list) else [])
            except KasouError as e:
                notes.append(f"disk I/O unavailable: {e}")
        else:
            notes.append("disk I/O unavailable: the monitor is busy")
        spec = None
        with contextlib.suppress(Exception):
            spec = rf.launch_spec(vm.files)
        nic_ids = [n.id for n in spec.nics] if spec is not None else list(vm.taps)
        user = {n.id for n in spec.nics if n.network == "user"} if spec is not None else set()
        for nic in nic_ids:
            if nic in user:
                s.nics.append(NicIO(id=nic, device=None, counted=False))
                continue
            dev = tap_name(vm.name, nic)
            c = read_net_counters(dev)
            s.nics.append(NicIO(id=nic, device=dev, counted=c is not None, **(c or {})))
        if user:
            notes.append(USER_NET_NOTE)
        s.note = "; ".join(notes) or None
        return s
