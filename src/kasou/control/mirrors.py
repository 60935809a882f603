"""Mirrored disks in the control plane: follow each copy's health, raise events, rebuild a lost copy.

The driver keeps the copies in sync and switches a disk to its second copy when the first fails
(:mod:`kasou.hypervisor.qemu.mirrors`); this module keeps the VM's record true to that (which
file the disk runs on, in which pool; the second copy's state), raises ``disk_degraded`` once
when a disk runs on one copy and ``disk_healthy`` when it has two again, and builds a new
second copy on request (``kasou disk rebuild``): online while the VM runs (a full mirror copy
while the guest writes), with ``qemu-img convert`` while it is stopped.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from typing import TYPE_CHECKING, Any, Protocol

from kasou.agent.models import DiskCreate
from kasou.control.base import VMControl
from kasou.control.jobs import JobContext
from kasou.control.records import JobRecord, VMRecord
from kasou.errors import AgentUnavailable, InvalidSpec, KasouError, NotFound, OperationTimeout, WrongState
from kasou.hypervisor.base import LaunchDisk, MirrorAttach, MirrorStatus
from kasou.model.spec import DiskSpec, MirrorCopy, validate_name
from kasou.model.state import VMState
from kasou.model.units import format_size

if TYPE_CHECKING:
    from kasou.control.pools import Pools

log = logging.getLogger(__name__)

MIN_REBUILD_MIB_S = 5.0  # the slowest copy rate a rebuild waits for (a 100 GiB disk: about 6 hours)
STALL_S = 120.0  # a rebuild whose copy makes no progress this long is given up
_RUNNING = (VMState.RUNNING, VMState.PAUSED)


def event_key(vm: str, disk_id: str) -> str:
    return f"disk/{vm}/{disk_id}"


def launch_disk(rec: VMRecord, d: DiskSpec) -> LaunchDisk:
    """A disk as its host runs it: a mirrored one with its second copy, copied in full unless known equal."""
    m = d.mirror
    usable = m is not None and m.path is not None and m.state != "degraded"
    return LaunchDisk(
        id=d.id,
        path=d.path or "",
        format=d.format,
        mirror=m.path if usable and m is not None else None,
        mirror_sync="none" if usable and m is not None and m.clean and rec.state == VMState.STOPPED else "full",
        port=d.port,
    )


def follow(d: DiskSpec, st: MirrorStatus) -> DiskSpec:
    """The disk's record after its host reported ``st`` (the copy it runs on may have changed)."""
    m = d.mirror
    if m is None or st.state == "none":
        return d
    if st.path is not None and d.path is not None and st.path != d.path:  # switched to the second copy
        return d.model_copy(update={
            "path": st.path,
            "pool": m.pool,
            "mirror": MirrorCopy(pool=d.pool, path=None, state="degraded", failed=d.path, error=st.error,
                                 since=time.time()),
        })  # fmt: skip
    if st.state == "degraded":
        if m.state == "degraded":
            return d
        upd = {"state": "degraded", "path": None, "failed": st.failed or m.path, "error": st.error, "clean": False}
        return d.model_copy(update={"mirror": m.model_copy(update=upd)})
    if m.state != st.state and m.path == st.second:
        return d.model_copy(update={"mirror": m.model_copy(update={"state": st.state, "error": None})})
    return d


class MirrorVMs(VMControl, Protocol):
    """What mirroring uses of :class:`kasou.control.vms.VMService`."""

    pools: Pools


class Mirrors:
    def __init__(self, vms: MirrorVMs) -> None:
        self.vms = vms

    # -- following the copies ----------------------------------------------------------------

    async def tick(self, records: list[VMRecord] | None = None) -> None:
        """Bring the records of running mirrored VMs up to date with their hosts; raise and clear events."""
        for rec in records if records is not None else await self.vms.records.all():
            if not any(d.mirror for d in rec.disks):
                continue
            if rec.state in _RUNNING and rec.job is None:
                try:
                    statuses = await self.vms.agents.get(rec.host).mirror_status(rec.name)
                except (AgentUnavailable, OperationTimeout, NotFound):
                    continue
                rec = await self._apply(rec.name, statuses) or rec
            await self._events(rec)

    async def _apply(self, name: str, statuses: list[MirrorStatus]) -> VMRecord | None:
        by_disk = {s.disk_id: s for s in statuses}

        def apply(r: VMRecord) -> VMRecord | None:
            disks = [follow(d, by_disk[d.id]) if d.id in by_disk else d for d in r.disks]
            return r.model_copy(update={"disks": disks}) if disks != r.disks else None

        with contextlib.suppress(NotFound):
            return await self.vms.records.update(name, apply)
        return None

    async def _events(self, rec: VMRecord) -> None:
        for d in rec.disks:
            m = d.mirror
            if m is None:
                continue
            key = event_key(rec.name, d.id)
            if m.state == "degraded":
                lost = f" ({m.failed})" if m.failed else ""
                await self.vms.events.raise_once(
                    key, "disk_degraded", f"vm/{rec.name}",
                    f"disk {d.id} of VM {rec.name} runs on one copy ({d.path}, pool {d.pool}); its copy in pool "
                    f"{m.pool}{lost} was lost: {m.error or 'unknown error'}. Rebuild it with: "
                    f"kasou disk rebuild {rec.name} {d.id} --pool POOL", "error",
                )  # fmt: skip
            elif m.state == "in_sync":
                await self.vms.events.clear(
                    key, "disk_healthy", f"disk {d.id} of VM {rec.name} has two copies again (pools {d.pool}, {m.pool})"
                )

    async def before_stop(self, rec: VMRecord) -> None:
        """Right before kasou stops a running VM: note the mirrored disks in sync (their next start copies nothing)."""
        if not any(d.mirror for d in rec.disks):
            return
        try:
            statuses = {s.disk_id: s for s in await self.vms.agents.get(rec.host).mirror_status(rec.name)}
        except KasouError:
            statuses = {}

        def apply(r: VMRecord) -> VMRecord:
            disks = []
            for d in r.disks:
                st = statuses.get(d.id)
                if d.mirror is not None:
                    d = follow(d, st) if st is not None else d
                    clean = (
                        st is not None
                        and st.state == "in_sync"
                        and d.mirror is not None
                        and d.mirror.state == "in_sync"
                    )
                    d = d.model_copy(update={"mirror": d.mirror.model_copy(update={"clean": clean})}) if d.mirror else d
                disks.append(d)
            return r.model_copy(update={"disks": disks})

        with contextlib.suppress(NotFound):
            await self.vms.records.update(rec.name, apply)

    async def started(self, name: str) -> None:
        """The VM runs: its copies may differ from now on until the next clean stop."""

        def apply(r: VMRecord) -> VMRecord | None:
            if not any(d.mirror and d.mirror.clean for d in r.disks):
                return None
            disks = [d.model_copy(update={"mirror": d.mirror.model_copy(update={"clean": False})}) if d.mirror else d
                     for d in r.disks]  # fmt: skip
            return r.model_copy(update={"disks": disks})

        with contextlib.suppress(NotFound):
            await self.vms.records.update(name, apply)

    # -- rebuild ----------------------------------------------------------------------------

    async def rebuild(self, name: str, disk_id: str, pool: str) -> JobRecord:
        """Give a mirrored disk a new second copy in ``pool`` (the VM may run and write meanwhile)."""
        validate_name(pool, "pool")
        rec = await self.vms.records.get(name)
        disk = next((d for d in rec.disks if d.id == disk_id), None)
        if disk is None:
            raise InvalidSpec(f"VM {name!r} has no disk {disk_id!r} (disks: {', '.join(d.id for d in rec.disks)})",
                              field="disk")  # fmt: skip
        if disk.mirror is None:
            raise InvalidSpec(f"disk {disk_id} of VM {name!r} is not mirrored", field="disk")
        if pool == disk.pool:
            raise InvalidSpec(
                f"disk {disk_id} runs on its copy in pool {pool!r}; give another pool for the second copy", field="pool"
            )
        try:
            target_pool = await self.vms.pools.get_record(pool)
        except NotFound as e:
            raise InvalidSpec(e.message, field="pool") from None
        source_pool = await self.vms.pools.get_record(disk.pool)
        if target_pool.shared != source_pool.shared:
            raise InvalidSpec("both copies must be on shared pools or both on local ones", field="pool")
        if rec.state not in (VMState.STOPPED, VMState.CRASHED, *_RUNNING):
            raise WrongState(f"VM {name!r} is {rec.state.value}; a disk can be rebuilt while it runs or is stopped")
        host = rec.host
        assert host is not None
        job_id = "j" + secrets.token_hex(5)

        def claim(r: VMRecord) -> VMRecord:
            if r.job is not None:
                raise WrongState(f"VM {name!r} is busy with job {r.job}; try again when it ends", job=r.job)
            return r.model_copy(update={"job": job_id})

        initial = 0 if rec.state in _RUNNING else await self._allocated(host, disk)
        room = self.vms.pools.reserve([(pool, host, disk.size_bytes, initial)])
        await room.__aenter__()  # checks the room now: a full pool is refused before anything happens
        try:
            await self.vms.records.update(name, claim)
        except BaseException:
            await room.__aexit__(None, None, None)
            raise

        async def run(ctx: JobContext) -> dict[str, Any]:
            try:
                return await self._rebuild(ctx, name, disk_id, target_pool.name, target_pool.path)
            finally:
                await room.__aexit__(None, None, None)

        return await self.vms.runner.submit("rebuild", name, run, job_id)

    async def _allocated(self, host: str, disk: DiskSpec) -> int:
        with contextlib.suppress(KasouError):
            return (await self.vms.agents.get(host).disk_info(disk.path or "")).allocated_bytes
        return disk.size_bytes

    async def _rebuild(
        self, ctx: JobContext, name: str, disk_id: str, pool: str, pool_path: str | None
    ) -> dict[str, Any]:
        rec = await self.vms.records.get(name)
        disk = next(d for d in rec.disks if d.id == disk_id)
        assert disk.mirror is not None
        agent = self.vms.agents.get(rec.host)
        running = rec.state in _RUNNING
        await ctx.progress(0.02, f"making the new copy in pool {pool}")
        req = DiskCreate(vm=name, disk_id=disk_id, pool=pool, pool_path=pool_path, size_bytes=disk.size_bytes,
                         source="blank" if running else "copy", copy_of=None if running else disk.path)  # fmt: skip
        t0 = time.monotonic()
        made = await agent.create_disk(req)
        try:
            if running:
                await agent.attach_mirror(name, MirrorAttach(disk_id=disk_id, target=made.path, sync="full"))
                await self._wait_in_sync(ctx, name, disk_id, disk.size_bytes)
        except BaseException:
            if running:
                with contextlib.suppress(KasouError):
                    await agent.detach_mirror(name, disk_id)
            with contextlib.suppress(KasouError):
                await agent.delete_disk(made.path)
            raise
        seconds = time.monotonic() - t0
        old = [p for p in (disk.mirror.path, disk.mirror.failed) if p and p not in (made.path, disk.path)]

        def apply(r: VMRecord) -> VMRecord:
            disks = [
                d.model_copy(update={"mirror": MirrorCopy(pool=pool, path=made.path, state="in_sync", clean=not running,
                                                          since=time.time())})
                if d.id == disk_id else d
                for d in r.disks
            ]  # fmt: skip
            return r.model_copy(update={"disks": disks})

        rec = await self.vms.records.update(name, apply) or rec
        for p in old:  # the copy that failed, or the second copy this one replaces
            with contextlib.suppress(KasouError):
                await agent.delete_disk(p)
        await self._events(rec)
        await ctx.progress(1.0, "in sync")
        rate = disk.size_bytes / 2**20 / seconds if seconds > 0 else 0.0
        return {"vm": name, "disk": disk_id, "pool": pool, "path": made.path, "seconds": round(seconds, 2),
                "mib_s": round(rate, 1), "online": running}  # fmt: skip

    async def _wait_in_sync(self, ctx: JobContext, name: str, disk_id: str, size: int) -> None:
        agent = self.vms.agents.get((await self.vms.records.get(name)).host)
        limit = 60.0 + size / 2**20 / MIN_REBUILD_MIB_S
        t0 = last_move = time.monotonic()
        best = -1.0
        while True:
            st = next((s for s in await agent.mirror_status(name) if s.disk_id == disk_id), None)
            if st is None or st.state == "degraded":
                why = st.error if st is not None else "the disk is gone"
                raise KasouError(f"the new copy of disk {disk_id} failed while being filled: {why}")
            if st.state == "in_sync":
                return
            now = time.monotonic()
            if st.progress > best:
                best, last_move = st.progress, now
            if now - last_move > STALL_S:
                raise OperationTimeout(f"filling the new copy of disk {disk_id} made no progress for {STALL_S:.0f} s")
            if now - t0 > limit:
                raise OperationTimeout(f"the new copy of disk {disk_id} ({format_size(size)}) was not in sync within "
                                       f"{limit:.0f} s")  # fmt: skip
            await ctx.progress(0.05 + 0.9 * st.progress, f"copying ({100 * st.progress:.0f} %)")
            await asyncio.sleep(0.2)

    # -- live migration ----------------------------------------------------------------------
    #
    # QEMU cannot carry a mirror job across a migration (the disk's copy to the destination is a
    # mirror job of its own). So, as a replicated disk's replica does, the second copy is given up
    # before the move and a new one is filled where the VM runs afterwards: for that while (the copy
    # and the fill) the disk runs on one copy, in state "syncing", and an I/O error there pauses the VM.

    async def drop_for_migration(self, rec: VMRecord) -> tuple[VMRecord, dict[str, list[str]]]:
        """End the second copies of ``rec``'s mirrored disks before it migrates.

        Returns the record as it is now and, per disk that had a second copy, the pools its new copy
        may go in (the second copy's pool first, then the pool the disk ran on)."""
        agent = self.vms.agents.get(rec.host)
        wants: dict[str, list[str]] = {}
        files: list[str] = []
        for d in rec.disks:
            if d.mirror is None:
                continue
            if d.mirror.path is not None:
                await agent.detach_mirror(rec.name, d.id)
                wants[d.id] = [d.mirror.pool, d.pool]
                files.append(d.mirror.path)
            if d.mirror.failed and d.mirror.failed != d.path:
                files.append(d.mirror.failed)

        def apply(r: VMRecord) -> VMRecord:
            disks = []
            for d in r.disks:
                if d.mirror is not None and d.id in wants:
                    d = d.model_copy(update={"mirror": d.mirror.model_copy(update={
                        "path": None, "state": "syncing", "clean": False, "failed": None, "error": None,
                        "since": time.time()})})  # fmt: skip
                elif d.mirror is not None and d.mirror.failed:
                    d = d.model_copy(update={"mirror": d.mirror.model_copy(update={"failed": None})})
                disks.append(d)
            return r.model_copy(update={"disks": disks})

        rec = await self.vms.records.update(rec.name, apply) or rec
        for f in files:  # the copies given up (they would be stale), and the files of copies that failed
            try:
                await agent.delete_disk(f)
            except KasouError as e:
                log.warning("could not delete %s on %s before migrating %s: %s", f, rec.host, rec.name, e.message)
        return rec, wants

    async def remirror(self, ctx: JobContext, name: str, wants: dict[str, list[str]]) -> dict[str, str]:
        """A new second copy of each disk in ``wants`` where the VM runs now (after a migration, or after
        one that failed, on its source). A disk that cannot get one is left degraded, with an event.
        Returns, per disk, its mirror's state or why it is degraded."""
        out: dict[str, str] = {}
        for disk_id, pools in wants.items():
            rec = await self.vms.records.get(name)
            d = next((x for x in rec.disks if x.id == disk_id), None)
            if d is None or d.mirror is None:
                continue
            pool = next((p for p in pools if p != d.pool), pools[0])
            try:
                target = await self.vms.pools.get_record(pool)
                assert rec.host is not None
                async with self.vms.pools.reserve([(target.name, rec.host, d.size_bytes, 0)]):
                    await self._rebuild(ctx, name, disk_id, target.name, target.path)
                out[disk_id] = "in_sync"
            except KasouError as e:
                why = f"no new second copy in pool {pool} on {rec.host}: {e.message}"
                log.error("disk %s of %s: %s", disk_id, name, why)
                out[disk_id] = why

                def degraded(r: VMRecord, disk_id: str = disk_id, pool: str = pool, why: str = why) -> VMRecord:
                    disks = [x.model_copy(update={"mirror": MirrorCopy(pool=pool, path=None, state="degraded",
                                                                       error=why, since=time.time())})
                             if x.id == disk_id else x for x in r.disks]  # fmt: skip
                    return r.model_copy(update={"disks": disks})

                with contextlib.suppress(NotFound):
                    await self._events(await self.vms.records.update(name, degraded) or rec)
        return out

    # -- delete ------------------------------------------------------------------------------

    @staticmethod
    def files(rec: VMRecord) -> list[str]:
        """Every file of the VM's mirrored copies (second copies and failed ones) besides the disks' own."""
        out = []
        for d in rec.disks:
            if d.mirror is not None:
                out += [p for p in (d.mirror.path, d.mirror.failed) if p and p != d.path]
        return out
