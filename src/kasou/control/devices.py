"""Devices and sizes that change on a defined VM: vCPUs and memory (at its next start), a disk grown (online or
offline), disks and NICs added and removed (hot-plug on a running VM). Part of
:class:`kasou.control.vms.VMService` (``VMService.devices``).

Each change follows the VM operations' phases: the arguments, then the prerequisites with no side effect (a
refusal is one line and changes nothing), then a job that claims the VM (so it never runs beside a migration,
a snapshot or a backup) and undoes what it did if a step fails: a disk file made for a plug that QEMU refused
is deleted, a record is changed only once the device is in.

What is refused, and the way out:

- a VM with snapshots: a revert would bring back other disks and sizes (delete its snapshots first);
- a replicated VM: its replica on another host would no longer match (not supported yet);
- a mirrored disk while it runs (grow it stopped: both copies grow), and a new disk for a mirrored VM (it
  would have no second copy; not supported yet);
- a disk or NIC on the machine's root bus while it runs (the boot disk, and what a VM was created with):
  QEMU cannot unplug it there (remove it stopped); the boot disk is never removed.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Protocol

from kasou.agent.models import DiskCreate
from kasou.control import scheduler
from kasou.control.base import VMControl
from kasou.control.jobs import JobContext
from kasou.control.records import JobRecord, VMRecord
from kasou.errors import AgentUnavailable, Conflict, InsufficientResources, InvalidSpec, KasouError, NotFound
from kasou.hypervisor.base import LaunchDisk
from kasou.model.devices import (
    HOTPLUG_PORTS,
    MAX_DISKS,
    MAX_NICS,
    DiskAdd,
    NicAdd,
    check_disk_id,
    check_nic_id,
    free_port,
    next_id,
)
from kasou.model.firmware import check_memory
from kasou.model.pools import DEFAULT_POOL
from kasou.model.spec import DiskSpec, NicSpec, VMUpdate, random_mac
from kasou.model.state import ACTIVE_STATES, Action, VMState
from kasou.model.units import format_size

if TYPE_CHECKING:
    from kasou.control.pools import Pools

log = logging.getLogger(__name__)

BOOT_DISK = "disk0"
SIZES_LATER = frozenset({VMState.CREATING, VMState.DELETING, VMState.TEMPLATE, VMState.MIGRATING})


class DeviceVMs(VMControl, Protocol):
    """What device changes use of :class:`kasou.control.vms.VMService`."""

    pools: Pools


class Devices:
    def __init__(self, vms: DeviceVMs) -> None:
        self.vms = vms

    # -- vCPUs and memory: at the next start ---------------------------------------------------------

    async def check_sizes(self, rec: VMRecord, upd: VMUpdate) -> None:
        """Refuse vCPUs or memory the VM could not start with: the limits of vm create, and its host's room
        as a start checks it (the scheduler's rules, with the VM's other load on that host)."""
        if not upd.sizes:
            return
        if rec.state in SIZES_LATER or rec.state == VMState.UNKNOWN:
            raise Conflict(f"cannot change the size of VM {rec.name!r} while it is {rec.state.value}")
        saved = [s.name for s in rec.snapshots if s.memory]
        if saved:
            raise Conflict(
                f"VM {rec.name!r} has snapshots with its memory ({', '.join(saved)}), which restore only with the "
                "vCPUs and memory it has now: delete them first (kasou snapshot delete)"
            )
        vcpus = upd.vcpus if upd.vcpus is not None else rec.vcpus
        memory = upd.memory_mib if upd.memory_mib is not None else rec.memory_mib
        check_memory(rec.firmware, memory)
        await self.vms.check_fits_some_host(vcpus, memory)
        loads = {h.name: h for h in await self.vms.host_loads(exclude=rec.name)}
        host = loads.get(rec.host or "")
        if host is None:
            raise AgentUnavailable(f"the agent of host {rec.host} does not answer: cannot check it can carry the VM")
        host.schedulable = True  # maintenance ends; what matters is whether the host could ever carry it
        req = scheduler.Request(rec.name, memory, vcpus, rec.anti_affinity)
        why = scheduler.why_not(host, req, self.vms.vcpu_ratio)
        if why is not None:
            raise InsufficientResources(f"VM {rec.name!r} could not start with {vcpus} vCPUs and {memory} MiB: {why}")

    @staticmethod
    def apply_sizes(r: VMRecord, upd: VMUpdate) -> dict[str, Any]:
        """The record's changes for new sizes: at once on a VM with no process, else waiting for its next start."""
        if not upd.sizes:
            return {}
        if r.state in ACTIVE_STATES:
            later = {**r.next_start, **upd.sizes}
            now = {"vcpus": r.vcpus, "memory_mib": r.memory_mib}
            return {"next_start": {k: v for k, v in later.items() if now[k] != v}}
        return {**upd.sizes, "next_start": {}}

    async def at_start(self, rec: VMRecord) -> VMRecord:
        """Before a start: vCPUs and memory set while it ran become its own, and it gets its hot-plug ports."""
        if any(s.memory for s in rec.snapshots):  # a saved memory state restores only on the machine it was
            return rec  # taken on: its sizes and ports stay until those snapshots are deleted
        if not rec.next_start and rec.pci_ports == HOTPLUG_PORTS:
            return rec
        upd = {**rec.next_start, "next_start": {}, "pci_ports": HOTPLUG_PORTS}
        new = await self.vms.records.update(rec.name, lambda r: r.model_copy(update=upd))
        assert new is not None
        return new

    # -- disks ---------------------------------------------------------------------------------------

    async def _prepare(self, name: str, what: str, disks: bool = True) -> VMRecord:
        """The VM, if its devices may change now; ``disks``: also what only a change of its disks must wait for
        (snapshots that a revert would undo, a replica that would no longer match)."""
        rec = await self.vms.records.get(name)
        if rec.state not in (VMState.RUNNING, VMState.STOPPED):
            raise Conflict(
                f"cannot {what} of VM {name!r} while it is {rec.state.value}: devices change on a running VM "
                "(hot-plug) or a stopped one"
            )
        if rec.job is not None:
            raise Conflict(f"VM {name!r} is busy with job {rec.job}; try again when it ends", job=rec.job)
        if disks and rec.snapshots:
            raise Conflict(
                f"cannot {what} of VM {name!r}: it has snapshots ({', '.join(s.name for s in rec.snapshots)}), and a "
                "revert would bring back its old disks; delete them first (kasou snapshot delete)"
            )
        if disks and rec.replicated:
            raise Conflict(
                f"cannot {what} of VM {name!r}: its disks are replicated to another host, and the replica would no "
                "longer match (not supported yet)"
            )
        if rec.state == VMState.RUNNING and not self.vms.agents.is_up(rec.host or ""):
            raise AgentUnavailable(f"the agent of host {rec.host} does not answer; VM {name!r} cannot change now")
        return rec

    def _disk(self, rec: VMRecord, disk_id: str) -> DiskSpec:
        check_disk_id(disk_id)
        disk = next((d for d in rec.disks if d.id == disk_id), None)
        if disk is None:
            raise NotFound(f"VM {rec.name!r} has no disk {disk_id} (it has {', '.join(d.id for d in rec.disks)})")
        return disk

    async def resize(self, name: str, disk_id: str, size_bytes: int) -> JobRecord:
        """Grow disk ``disk_id`` to ``size_bytes``: online on a running VM, with qemu-img on a stopped one."""
        rec = await self._prepare(name, "resize a disk")
        disk = self._disk(rec, disk_id)
        if size_bytes < disk.size_bytes:
            raise InvalidSpec(
                f"disk {disk_id} of VM {name!r} is {format_size(disk.size_bytes)}; {format_size(size_bytes)} would "
                "cut off its end: a disk only grows (copy the data to a smaller new disk instead)",
                field="size",
            )
        if size_bytes == disk.size_bytes:
            raise InvalidSpec(f"disk {disk_id} of VM {name!r} is {format_size(size_bytes)} already", field="size")
        running = rec.state == VMState.RUNNING
        if disk.mirror is not None and running:
            raise Conflict(
                f"disk {disk_id} of VM {name!r} is mirrored: stop the VM and resize it then (both copies grow)"
            )
        if disk.mirror is not None and disk.mirror.path is None:
            raise Conflict(f"disk {disk_id} of VM {name!r} is mirrored and degraded: rebuild its second copy first")
        grow = size_bytes - disk.size_bytes
        wants = [(disk.pool, rec.host or "", grow, 0)]
        if disk.mirror is not None:
            wants.append((disk.mirror.pool, rec.host or "", grow, 0))
        room: contextlib.AbstractAsyncContextManager[None] = contextlib.nullcontext()
        if not (disk.shared and disk.pool == DEFAULT_POOL):  # the shared directory is no host's pool (as at create)
            room = self.vms.pools.reserve(wants)

        async def run(ctx: JobContext) -> dict[str, Any]:
            cur = await self.vms.records.get(name)
            agent = self.vms.agents.get(cur.host)
            await ctx.progress(0.2, f"growing {disk_id} to {format_size(size_bytes)}")
            if running:
                await agent.grow_disk(name, disk_id, size_bytes)
            else:
                for path in (disk.path, disk.mirror.path if disk.mirror else None):
                    if path is not None:
                        await agent.grow_file(path, size_bytes)

            def apply(r: VMRecord) -> VMRecord:
                disks = [d.model_copy(update={"size_bytes": size_bytes}) if d.id == disk_id else d for d in r.disks]
                return r.model_copy(update={"disks": disks})

            await self.vms.records.update(name, apply)
            await ctx.progress(1.0, "done")
            return {"vm": name, "disk": disk_id, "size_bytes": size_bytes, "online": running}

        return await self._submit_holding(rec, "disk-resize", room, run)

    async def add_disk(self, name: str, req: DiskAdd) -> JobRecord:
        """A new empty disk, on the VM's kind of storage (its pool unless given); plugged in if it runs."""
        rec = await self._prepare(name, "add a disk")
        if len(rec.disks) >= MAX_DISKS:
            raise InvalidSpec(f"VM {name!r} has {len(rec.disks)} disks, the most a VM may have", field="size")
        if any(d.mirror is not None for d in rec.disks):
            raise Conflict(
                f"VM {name!r} has mirrored disks, and a new disk would have no second copy (not supported yet)"
            )
        boot = rec.disks[0] if rec.disks else None
        shared = boot.shared if boot is not None else False
        try:
            pool = await self.vms.pools.get_record(req.pool or (boot.pool if boot is not None else DEFAULT_POOL))
        except NotFound as e:
            raise InvalidSpec(e.message, field="pool") from None
        if pool.shared != shared and pool.path is not None:
            kind = "shared" if shared else "local"
            raise InvalidSpec(
                f"VM {name!r} runs on {kind} storage and pool {pool.name!r} is not {kind}: its disks must all be "
                f"reached the same way (choose a {kind} pool)",
                field="pool",
            )
        running = rec.state == VMState.RUNNING
        port = self._port(rec, running, "disk")
        disk_id = next_id("disk", [d.id for d in rec.disks])
        size = req.size_bytes
        room: contextlib.AbstractAsyncContextManager[None] = contextlib.nullcontext()
        if not shared:  # the shared directory is not a pool of one host
            room = self.vms.pools.reserve([(pool.name, rec.host or "", size, 0)])

        async def run(ctx: JobContext) -> dict[str, Any]:
            cur = await self.vms.records.get(name)
            agent = self.vms.agents.get(cur.host)
            await ctx.progress(0.2, f"creating {disk_id} ({format_size(size)})")
            info = await agent.create_disk(DiskCreate(
                vm=name, disk_id=disk_id, size_bytes=size, source="blank", shared=shared,
                pool=pool.name if pool.path is not None else None, pool_path=pool.path,
            ))  # fmt: skip
            new = DiskSpec(id=disk_id, size_bytes=info.size_bytes, format=info.format, path=info.path,
                           shared=shared, pool=pool.name, port=port)  # fmt: skip
            try:
                if running:
                    await ctx.progress(0.6, f"plugging {disk_id} in")
                    await agent.plug_disk(name, LaunchDisk(id=disk_id, path=info.path, format=info.format,
                                                           size_bytes=info.size_bytes, port=port))  # fmt: skip
                await self.vms.records.update(name, lambda r: r.model_copy(update={"disks": [*r.disks, new]}))
            except BaseException:
                if running:
                    with contextlib.suppress(KasouError):
                        await agent.unplug_disk(name, disk_id, timeout_s=10)
                with contextlib.suppress(KasouError):
                    await agent.delete_disk(info.path)
                raise
            await ctx.progress(1.0, "done")
            return {"vm": name, "disk": disk_id, "path": info.path, "hotplug": running}

        return await self._submit_holding(rec, "disk-add", room, run)

    async def remove_disk(self, name: str, disk_id: str) -> JobRecord:
        """Unplug a disk (if the VM runs) and delete its file; never the boot disk."""
        rec = await self._prepare(name, "remove a disk")
        disk = self._disk(rec, disk_id)
        if disk_id == BOOT_DISK or (rec.disks and rec.disks[0].id == disk_id):
            raise Conflict(
                f"{disk_id} is the boot disk of VM {name!r}: it is removed only with the VM (kasou vm delete)"
            )
        running = rec.state == VMState.RUNNING
        if running and disk.port is None:
            raise Conflict(
                f"disk {disk_id} of VM {name!r} is on the machine's root bus, where it cannot be unplugged while the "
                "VM runs: stop the VM and remove it then"
            )
        if running and disk.mirror is not None:
            raise Conflict(f"disk {disk_id} of VM {name!r} is mirrored: stop the VM and remove it then")
        job_id = self.vms.new_job_id()
        await self._claim(rec, job_id)

        async def run(ctx: JobContext) -> dict[str, Any]:
            cur = await self.vms.records.get(name)
            agent = self.vms.agents.get(cur.host)
            if running:
                await ctx.progress(0.2, f"unplugging {disk_id} (the guest must let go of it)")
                await agent.unplug_disk(name, disk_id)
            await self.vms.records.update(
                name, lambda r: r.model_copy(update={"disks": [d for d in r.disks if d.id != disk_id]})
            )
            await ctx.progress(0.8, f"deleting the file of {disk_id}")
            for path in (disk.path, disk.mirror.path if disk.mirror else None):
                if path is not None:
                    try:
                        await agent.delete_disk(path)
                    except KasouError as e:  # the VM no longer has it: the file is only left over
                        log.warning("VM %s: the file %s of removed disk %s is left: %s", name, path, disk_id, e)
            await ctx.progress(1.0, "done")
            return {"vm": name, "disk": disk_id, "hotplug": running}

        return await self.vms.runner.submit("disk-remove", name, run, job_id)

    # -- NICs ----------------------------------------------------------------------------------------

    async def add_nic(self, name: str, req: NicAdd) -> JobRecord:
        """A new NIC on ``req.network`` with a MAC no other VM has; plugged in if the VM runs."""
        rec = await self._prepare(name, "add a NIC", disks=False)
        if len(rec.nics) >= MAX_NICS:
            raise InvalidSpec(f"VM {name!r} has {len(rec.nics)} NICs, the most a VM may have", field="network")
        vlan = await self.vms.networks.resolve(req.network, rec.department)
        running = rec.state == VMState.RUNNING
        port = self._port(rec, running, "NIC")
        taken = {n.mac for r in await self.vms.records.all() for n in r.nics}
        mac = random_mac()
        while mac in taken:
            mac = random_mac()
        nic = NicSpec(id=next_id("net", [n.id for n in rec.nics]), mac=mac, network=req.network, vlan=vlan, port=port,
                      isolated=await self.vms.networks.is_isolated(req.network))  # fmt: skip
        job_id = self.vms.new_job_id()
        await self._claim(rec, job_id)

        async def run(ctx: JobContext) -> dict[str, Any]:
            cur = await self.vms.records.get(name)
            agent = self.vms.agents.get(cur.host)
            if running:
                await ctx.progress(0.3, f"plugging {nic.id} in ({req.network})")
                await agent.plug_nic(name, nic)
            try:
                await self.vms.records.update(name, lambda r: r.model_copy(update={"nics": [*r.nics, nic]}))
            except BaseException:
                if running:
                    with contextlib.suppress(KasouError):
                        await agent.unplug_nic(name, nic.id, timeout_s=10)
                raise
            await ctx.progress(1.0, "done")
            return {"vm": name, "nic": nic.id, "mac": nic.mac, "hotplug": running}

        return await self.vms.runner.submit("nic-add", name, run, job_id)

    async def remove_nic(self, name: str, nic_id: str) -> JobRecord:
        rec = await self._prepare(name, "remove a NIC", disks=False)
        check_nic_id(nic_id)
        nic = next((n for n in rec.nics if n.id == nic_id), None)
        if nic is None:
            raise NotFound(f"VM {name!r} has no NIC {nic_id} (it has {', '.join(n.id for n in rec.nics) or 'none'})")
        running = rec.state == VMState.RUNNING
        if running and nic.port is None:
            raise Conflict(
                f"NIC {nic_id} of VM {name!r} is on the machine's root bus, where it cannot be unplugged while the VM "
                "runs: stop the VM and remove it then"
            )
        job_id = self.vms.new_job_id()
        await self._claim(rec, job_id)

        async def run(ctx: JobContext) -> dict[str, Any]:
            cur = await self.vms.records.get(name)
            if running:
                await ctx.progress(0.3, f"unplugging {nic_id} (the guest must let go of it)")
                await self.vms.agents.get(cur.host).unplug_nic(name, nic_id)
            await self.vms.records.update(
                name, lambda r: r.model_copy(update={"nics": [n for n in r.nics if n.id != nic_id]})
            )
            await ctx.progress(1.0, "done")
            return {"vm": name, "nic": nic_id, "hotplug": running}

        return await self.vms.runner.submit("nic-remove", name, run, job_id)

    def _port(self, rec: VMRecord, running: bool, what: str) -> int | None:
        """A free hot-plug port for a new device: of those its QEMU has (running; none: refused), or of those
        it gets at its next start (stopped; none free: the root bus)."""
        used = {d.port for d in rec.disks} | {n.port for n in rec.nics}
        port = free_port(used, (rec.pci_ports or 0) if running else HOTPLUG_PORTS)
        if running and port is None:
            raise Conflict(self._no_port(rec, what))
        return port

    async def _submit_holding(
        self, rec: VMRecord, kind: str, room: contextlib.AbstractAsyncContextManager[None],
        body: Callable[[JobContext], Awaitable[dict[str, Any]]],
    ) -> JobRecord:  # fmt: skip
        """Take ``room`` in its pools now (refused with the numbers if there is none), hold the VM for a job of
        ``kind`` running ``body``, and give the room back when the job ends (or if the VM cannot be held)."""
        await room.__aenter__()
        job_id = self.vms.new_job_id()
        try:
            await self._claim(rec, job_id)
        except BaseException:
            await room.__aexit__(None, None, None)
            raise

        async def run(ctx: JobContext) -> dict[str, Any]:
            try:
                return await body(ctx)
            finally:
                await room.__aexit__(None, None, None)

        return await self.vms.runner.submit(kind, rec.name, run, job_id)

    async def _claim(self, rec: VMRecord, job_id: str) -> None:
        """Hold the VM for the job, if it is still in the state its checks were made for."""
        claimed = await self.vms.runner.claim(rec.name, Action.DEVICES, job_id)
        if claimed.state != rec.state or claimed.host != rec.host:

            def free(r: VMRecord) -> VMRecord | None:
                return r.model_copy(update={"job": None}) if r.job == job_id else None

            await self.vms.records.update(rec.name, free)
            raise Conflict(
                f"VM {rec.name!r} changed from {rec.state.value} to {claimed.state.value} meanwhile; try again"
            )

    @staticmethod
    def _no_port(rec: VMRecord, what: str) -> str:
        if not rec.pci_ports:
            return (
                f"VM {rec.name!r} was started before kasou gave VMs hot-plug ports: add the {what} while it is "
                "stopped, or stop and start it once"
            )
        return f"VM {rec.name!r} has no free hot-plug port (it has {rec.pci_ports}): add the {what} while it is stopped"
