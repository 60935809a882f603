"""Live migration and maintenance mode: VMs move between hosts and never stop.

A migration is a protocol of small agent steps (Ganeti's tasklet), each of
which can fail on its own:

1. the destination prepares an incoming QEMU, paused (``-S``); with local disks
   it also creates empty disks and exports them over NBD;
2. the source starts the migration (with local disks: ``blockdev-mirror`` in
   write-blocking mode to the exports first, then the memory);
3. the control plane follows ``query-migrate`` until it completes;
4. only then does the destination run (``cont``): the point of no return;
5. the source's QEMU (paused after the migration) ends, and with local disks
   its disk files go.

A failure before step 4 aborts both sides: the migration and mirrors are
cancelled on the source (which keeps running) and the incoming QEMU and its
disks are removed on the destination. So exactly one copy runs at every moment.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from kasou.config import maintenance_retry
from kasou.control import balancing, scheduler
from kasou.control.base import VMControl
from kasou.control.hosts import HostView, flags_key, maintenance_hosts
from kasou.control.jobs import JobContext
from kasou.control.media import check_iso_on
from kasou.control.records import JobRecord, LedgerEvent, VMRecord
from kasou.errors import (
    Conflict,
    HypervisorError,
    InsufficientResources,
    InvalidSpec,
    KasouError,
    NotFound,
    OperationTimeout,
    WrongState,
)
from kasou.hypervisor.base import LaunchDisk, RuntimeState
from kasou.model.firmware import moved
from kasou.model.pools import DEFAULT_POOL
from kasou.model.spec import validate_name
from kasou.model.state import Action, VMState, check_action

if TYPE_CHECKING:
    from kasou.agent.client import AgentClient
    from kasou.control.mirrors import Mirrors
    from kasou.control.pools import Pools
    from kasou.control.replication import Replication
    from kasou.hypervisor.base import MigrationStorage

log = logging.getLogger(__name__)

DEFAULT_DOWNTIME_MS = 100
MIGRATION_TIMEOUT_S = 900.0
MAINTENANCE_PARALLEL = 2  # migrations at once while a host empties: enough to be quick, few enough to converge


class MigrateVMs(VMControl, Protocol):
    """What migration uses of :class:`kasou.control.vms.VMService`."""

    mirrors: Mirrors
    pools: Pools
    replication: Replication


class Migrations:
    def __init__(self, vms: MigrateVMs) -> None:
        self.vms = vms
        self.agents = vms.agents
        self.store = vms.store

    # -- hosts -----------------------------------------------------------------------

    async def _check_host(self, host: str, what: str = "host") -> None:
        validate_name(host, what)
        await self.agents.refresh(force=True)
        if host not in self.agents.known():
            raise NotFound(f"no host named {host!r}")

    async def host_views(self) -> list[HostView]:
        await self.agents.refresh(force=True)
        loads = {h.name: h for h in await self.vms.host_loads()}
        maintenance = await maintenance_hosts(self.store)
        records = await self.vms.records.all()
        out = []
        for name in self.agents.known():
            load = loads.get(name)
            up = self.agents.is_up(name) and load is not None
            view = HostView(
                name=name,
                state="down" if not up else ("maintenance" if name in maintenance else "up"),
                address=str(self.agents.record(name).get("agent_url") or "") or None,
                maintenance=name in maintenance,
                vms_running=sum(1 for r in records if r.host == name and r.state in _RUNNING),
            )
            if load is not None:
                view.cpus = load.cpus
                view.memory_total_mib = load.memory_total_mib
                view.memory_capacity_mib = load.memory_capacity_mib
                view.memory_used_mib = load.memory_used_mib
                view.memory_free_mib = load.memory_free_mib
                view.vcpus_used = load.vcpus_used
                with contextlib.suppress(KasouError):
                    info = await self.agents.get(name).host_info()
                    view.load_1m = info.load_1m
                    view.accelerator = info.accelerator
            out.append(view)
        return out

    # -- migration -------------------------------------------------------------------

    async def migrate(
        self,
        name: str,
        to: str | None = None,
        downtime_ms: int = DEFAULT_DOWNTIME_MS,
        auto_converge: bool = True,
        bandwidth_mib_s: int | None = None,
    ) -> JobRecord:
        """Live-migrate a running VM (to ``to``, or where the scheduler puts it)."""
        if not 1 <= downtime_ms <= 60000:
            raise InvalidSpec(f"downtime_ms must be between 1 and 60000, not {downtime_ms}", field="downtime_ms")
        if bandwidth_mib_s is not None and not 1 <= bandwidth_mib_s <= 100000:
            raise InvalidSpec(f"bandwidth_mib_s must be between 1 and 100000, not {bandwidth_mib_s}")
        rec = await self.vms.records.get(name)
        if rec.snapshots:  # their layers live on this host; a copy migration would move the active layer only
            raise WrongState(f"VM {name!r} has snapshots; delete them before migrating it (kasou snapshot delete)")
        target = await self._choose_target(rec, to)
        await check_iso_on(self.vms, rec, target)  # a disc in its drive: the same ISO image there
        if not all(d.shared for d in rec.disks):  # a local pool without room on the destination: refused now
            async with self.vms.pools.reserve((await self._destination_disks(rec, target))[1]):
                pass
        job_id = "j" + secrets.token_hex(5)
        rec = await self.vms.runner.claim(name, Action.MIGRATE, job_id)
        await self.vms.records.set(name, state=VMState.MIGRATING)

        async def run(ctx: JobContext) -> dict[str, Any]:
            return await self._migrate(ctx, rec, target, downtime_ms, auto_converge, bandwidth_mib_s)

        return await self.vms.runner.submit("migrate", name, run, job_id)

    async def _choose_target(self, rec: VMRecord, to: str | None, exclude: set[str] | None = None) -> str:
        if to is not None:
            await self._check_host(to)
            if to == rec.host:
                raise InvalidSpec(f"VM {rec.name!r} already runs on {to}; choose another host", field="to")
        if rec.job is not None:
            raise WrongState(f"VM {rec.name!r} is busy with job {rec.job}; try again when it ends", job=rec.job)
        check_action(rec.name, Action.MIGRATE, rec.state)
        loads = [h for h in await self.vms.host_loads(exclude=rec.name) if h.name != rec.host]
        if exclude:
            loads = [h for h in loads if h.name not in exclude]
        req = scheduler.Request.of(rec)
        if to is not None:
            load = next((h for h in loads if h.name == to), None)
            if load is None:
                raise Conflict(f"host {to} is not up; it cannot take VM {rec.name!r}")
            why = scheduler.why_not(load, req, self.vms.vcpu_ratio)
            if why is not None:
                raise InsufficientResources(f"cannot migrate {rec.name!r} to {to}: {why}")
            return to
        if not loads:
            raise InsufficientResources(f"there is no other host to migrate {rec.name!r} to")
        return balancing.place_spread(req, loads, self.vms.vcpu_ratio).name

    async def _migrate(
        self,
        ctx: JobContext,
        rec: VMRecord,
        target: str,
        downtime_ms: int,
        auto_converge: bool,
        bandwidth_mib_s: int | None = None,
    ) -> dict[str, Any]:
        copy = not all(d.shared for d in rec.disks)
        try:
            new_paths, room = await self._destination_disks(rec, target) if copy else ({}, [])
            async with self.vms.pools.reserve(room):  # the pools' room on the destination, held while it moves
                return await self._move(ctx, rec, target, copy, new_paths, downtime_ms, auto_converge,
                                        bandwidth_mib_s)  # fmt: skip
        except BaseException:
            # Failed before anything moved (the room, the second copies): it runs on where it was.
            with contextlib.suppress(KasouError):
                cur = await self.vms.records.get(rec.name)
                if cur.state == VMState.MIGRATING and cur.host == rec.host:
                    await self.vms.records.set(rec.name, state=VMState.RUNNING)
            raise

    async def _destination_disks(
        self, rec: VMRecord, target: str
    ) -> tuple[dict[str, str], list[tuple[str, str, int, int]]]:
        """Where each disk goes on ``target`` (a shared one stays), and the room that takes in local pools.

        A disk of a local pool goes into that pool's directory on the destination, under another file
        name than the source's (``disk0.qcow2`` and ``disk0-2.qcow2`` in turn): on storage that both hosts
        happen to see (a lab on one machine, a pool path mounted by mistake on both) they never collide."""
        disks_dir = str(self.agents.record(target).get("disks_dir") or "")
        if not disks_dir:
            raise HypervisorError(f"host {target} did not say where its disks live; is its agent current?")
        paths: dict[str, str] = {}
        room: list[tuple[str, str, int, int]] = []
        for d in rec.disks:
            if d.shared:
                paths[d.id] = d.path or ""
                continue
            pool = await self.vms.pools.get_record(d.pool) if d.pool != DEFAULT_POOL else None
            if pool is None or pool.path is None or pool.shared:
                paths[d.id] = f"{disks_dir}/{rec.name}/{d.id}.qcow2"
                continue
            stem = f"{d.id}-2" if Path(d.path or "").name == f"{d.id}.qcow2" else d.id
            paths[d.id] = f"{pool.path}/{rec.name}/{stem}.qcow2"
            room.append((pool.name, target, d.size_bytes, 0))
        return paths, room

    async def _move(
        self,
        ctx: JobContext,
        rec: VMRecord,
        target: str,
        copy: bool,
        new_paths: dict[str, str],
        downtime_ms: int,
        auto_converge: bool,
        bandwidth_mib_s: int | None,
    ) -> dict[str, Any]:
        name, source = rec.name, rec.host
        if rec.replica is not None:  # QEMU cannot carry the mirror across: a new replica follows the move
            await ctx.progress(0.01, "detaching the disk replica")
            await self.vms.replication.drop(rec)
        # Mirrored disks likewise: their second copies end here and new ones are filled after the move.
        remirror: dict[str, list[str]] = {}
        if any(d.mirror is not None for d in rec.disks):
            await ctx.progress(0.01, "ending the mirrored disks' second copies (new ones follow the move)")
            try:
                rec, remirror = await self.vms.mirrors.drop_for_migration(rec)
            except BaseException:
                await self._mirrors_back(ctx, name, rec)
                raise
        mirrored = {d.id for d in rec.disks if d.mirror is not None}
        src = self.agents.get(source)
        dst = self.agents.get(target)
        spec = self.vms.launch_spec(rec)
        if copy:
            disks = [LaunchDisk(id=d.id, path=new_paths[d.id], format=d.format, size_bytes=d.size_bytes, port=d.port)
                     for d in rec.disks]  # fmt: skip
            spec = spec.model_copy(update={"disks": disks})
        # The UEFI variables go with the disks; the TPM's state always to a new directory (kasou.model.firmware).
        home = str(Path(new_paths[rec.disks[0].id]).parent) if copy and rec.disks else None
        nvram, tpm_state = moved(rec.nvram, rec.tpm_state, home)
        spec = spec.model_copy(update={"nvram": nvram, "tpm_state": tpm_state})
        if mirrored:  # the destination's devices pause on an I/O error as the source's do
            spec = spec.model_copy(
                update={
                    "disks": [
                        ld.model_copy(update={"stop_on_error": True}) if ld.id in mirrored else ld for ld in spec.disks
                    ]
                }
            )
        storage: MigrationStorage = "copy" if copy else "shared"
        incoming = None
        started = finishing = False
        status = None
        t0 = time.monotonic()
        try:
            await ctx.progress(0.02, f"preparing {target}")
            incoming = await dst.prepare_incoming(spec, storage)
            await ctx.progress(0.05, f"migrating to {target}")
            started = True  # from here the source may hold migration state to undo
            await src.migrate_out(
                name, incoming, downtime_ms=downtime_ms, auto_converge=auto_converge, bandwidth_mib_s=bandwidth_mib_s
            )
            while True:
                status = await src.migration_status(name)
                if status.status == "completed":
                    break
                if status.status in ("failed", "cancelled", "cancelling", "none"):
                    why = status.error or "no reason given"
                    raise HypervisorError(f"the migration of {name!r} {status.status}: {why}")
                if time.monotonic() - t0 > MIGRATION_TIMEOUT_S:
                    limit = MIGRATION_TIMEOUT_S
                    raise OperationTimeout(f"the migration of {name!r} did not finish within {limit:.0f} s")
                await ctx.progress(0.05 + 0.85 * status.progress, f"{status.status} ({status.progress:.0%})")
                await asyncio.sleep(0.05)
            await ctx.progress(0.92, f"starting on {target}")
            finishing = True
            await dst.finish_incoming(name)
        except BaseException as e:
            if finishing and await self._runs_on(dst, name):
                pass  # the destination runs after all (only its answer was lost): carry on below
            else:
                kept = await self._abort(name, src if started else None, dst if incoming else None, finishing)
                await self.vms.records.set(
                    name,
                    state=VMState.RUNNING if kept else VMState.PAUSED,
                    last_error=None if kept else "a failed migration left it paused",
                )
                if kept and remirror:  # it runs on where it was: its disks get their second copies there again
                    with contextlib.suppress(KasouError):
                        await self.vms.mirrors.remirror(ctx, name, remirror)
                if isinstance(e, KasouError):
                    where = f"it still runs on {source}" if kept else f"it is paused on {source}; check {target}"
                    raise type(e)(f"migration of {name!r} to {target} failed, {where}: {e.message}") from None
                raise
        # The destination runs: from here on the source copy must only go away.
        moved_disks = [d.model_copy(update={"path": new_paths[d.id]}) if copy else d for d in rec.disks]
        await self.vms.records.set(name, state=VMState.RUNNING, host=target, disks=moved_disks, ha_armed=spec.ha,
                                   nvram=nvram, tpm_state=tpm_state)  # fmt: skip
        detail = f"from {source} to {target}"
        if status is not None and status.downtime_ms is not None:
            detail += f", downtime {status.downtime_ms} ms, total {status.total_ms} ms"
        await self.vms.ledger.record(name, LedgerEvent.MIGRATED, target, detail, from_host=source)
        await ctx.progress(0.96, f"cleaning up {source}")
        old_disks = [d.path for d in rec.disks if copy and not d.shared and d.path]
        old_disks += [p for p in (rec.nvram if nvram != rec.nvram else None, rec.tpm_state) if p]
        warnings = await self._finish_source(name, source, target, old_disks)
        mirrors = await self.vms.mirrors.remirror(ctx, name, remirror) if remirror else {}
        return {
            **({"mirrors": mirrors} if mirrors else {}),
            **({"warnings": warnings} if warnings else {}),
            "vm": name,
            "from": source,
            "to": target,
            "storage": storage,
            "downtime_ms": status.downtime_ms if status else None,
            "total_ms": status.total_ms if status else None,
            "state": VMState.RUNNING.value,
        }

    async def _mirrors_back(self, ctx: JobContext, name: str, rec: VMRecord) -> None:
        """Ending the second copies failed part-way: give every mirrored disk that lost its copy a new one."""
        with contextlib.suppress(KasouError):
            now = await self.vms.records.get(name)
            before = {d.id: d for d in rec.disks}
            wants = {d.id: [d.mirror.pool, before[d.id].pool] for d in now.disks
                     if d.mirror is not None and d.mirror.path is None and d.mirror.state == "syncing"
                     and d.id in before}  # fmt: skip
            if wants:
                await self.vms.mirrors.remirror(ctx, name, wants)

    async def _runs_on(self, agent: AgentClient, name: str) -> bool:
        with contextlib.suppress(KasouError):
            return bool((await agent.info(name)).state == RuntimeState.RUNNING)
        return False

    async def _abort(self, name: str, src: AgentClient | None, dst: AgentClient | None, finishing: bool) -> bool:
        """Undo a migration that did not reach its destination. True if the source runs on.

        The destination goes first: once the source reported completion it may be
        resumed only when the incoming copy is certainly gone (``force``), so that
        two copies can never run.
        """
        dst_gone = dst is None
        if dst is not None:
            try:
                await dst.abort_incoming(name)
                dst_gone = True
            except KasouError as e:
                log.error("removing the incoming copy of %s failed: %s", name, e.message)
        if src is None:
            return True
        try:
            await src.abort_out(name, force=dst_gone)
            return True
        except KasouError as e:
            log.error("aborting the migration of %s on its source failed: %s", name, e.message)
            return await self._runs_on(src, name) and not finishing

    async def _finish_source(self, name: str, source: str | None, target: str, old_disks: list[str]) -> list[str]:
        """End the source's copy (paused since the migration completed) and delete its old disk files.

        Returns warnings for the job's result: an old copy that could not be ended (or whose state is
        unknown) is also an operator event, and its disk files stay until someone ends it. It must never
        run again: the VM runs on ``target`` now."""
        src = self.agents.get(source)
        try:
            await src.finish_out(name)
        except KasouError as e:
            log.error("finishing %s on %s failed (%s); stopping the source copy", name, source, e.message)
            left = await self._end_old_copy(src, name)
            if left is not None:
                twice = " AND RUNNING: the VM runs twice" if left == RuntimeState.RUNNING.value else ""
                msg = (
                    f"VM {name!r} runs on {target}, but its old copy on {source} could not be ended "
                    f"({e.message}); that copy is {left} there{twice}. It must never run again: end its QEMU "
                    f"on {source} (kasou keeps its disk files there until then)"
                )
                await self.vms.events.emit("migration_source_left", f"vm/{name}", msg, "error")
                return [msg]
        for path in old_disks:
            try:
                await src.delete_disk(path)
            except KasouError as e:
                log.error("could not delete %s on %s after migrating %s: %s", path, source, name, e.message)
        return []

    async def _end_old_copy(self, src: AgentClient, name: str) -> str | None:
        """Stop a source copy that ``finish_out`` did not end. None: it is gone; else its state (or why unknown)."""
        with contextlib.suppress(KasouError):
            await src.action(name, "stop")
        try:
            info = await src.info(name)
        except NotFound:
            return None
        except KasouError as e:
            return f"in an unknown state (its host does not say: {e.message})"
        if info is None or info.state in (RuntimeState.EXITED, RuntimeState.CRASHED):
            with contextlib.suppress(KasouError):
                await src.forget(name)
            return None
        return str(info.state.value)

    # -- maintenance -----------------------------------------------------------------

    async def maintenance(self, host: str, on: bool = True) -> JobRecord | None:
        """Empty ``host`` by live migration and keep it out of placement (``on=False`` returns it)."""
        await self._check_host(host)
        if not on:
            await self.store.put(flags_key(host), {"maintenance": False, "since": time.time()})
            return None
        records = [r for r in await self.vms.records.all() if r.host == host and r.state in _RUNNING]
        busy = [r.name for r in records if r.job is not None]
        if busy:
            raise WrongState(f"cannot empty {host}: VMs are busy with other jobs: {', '.join(busy)}")
        plan = await self._plan_evacuation(host, records)
        await self.store.put(flags_key(host), {"maintenance": True, "since": time.time()})

        async def run(ctx: JobContext) -> dict[str, Any]:
            return await self._evacuate(ctx, host, plan)

        return await self.vms.jobs.submit("maintenance", None, run)

    async def _plan_evacuation(self, host: str, records: list[VMRecord]) -> dict[str, str]:
        """Where each VM goes, decided up front: refuse before moving anything if they cannot all fit.

        Largest first, each to the host its arrival leaves least loaded with the ones placed before it counted
        (:func:`kasou.control.balancing.place_spread`, the balancer's scoring): the VMs spread over all the
        remaining hosts by load, never all onto the one that looked emptiest."""
        loads = [h for h in await self.vms.host_loads() if h.name != host]
        plan: dict[str, str] = {}
        for r in sorted(records, key=lambda r: (-r.memory_mib, r.name)):
            req = scheduler.Request.of(r)
            try:
                target = balancing.place_spread(req, loads, self.vms.vcpu_ratio)
            except InsufficientResources as e:
                raise InsufficientResources(
                    f"cannot put {host} in maintenance: the other hosts cannot take its VMs ({e.message})"
                ) from None
            try:
                await check_iso_on(self.vms, r, target.name)
            except WrongState as e:
                raise WrongState(f"cannot put {host} in maintenance: {e.message}") from None
            target.add(r.memory_mib, r.vcpus, r.anti_affinity)
            plan[r.name] = target.name
        return plan

    async def _evacuate(self, ctx: JobContext, host: str, plan: dict[str, str]) -> dict[str, Any]:
        """Move every planned VM off ``host``; a move that fails is tried again with back-off (a busy
        host's QMP answers late, a destination is briefly short of room) within the bounds of
        :func:`kasou.config.maintenance_retry`; only then is what is left reported, with its reason."""
        policy = maintenance_retry()
        deadline = time.monotonic() + policy.total_s
        total = len(plan)
        done: list[str] = []
        failed: dict[str, str] = {}
        attempts: dict[str, int] = {}
        warnings: list[str] = []
        sem = asyncio.Semaphore(MAINTENANCE_PARALLEL)

        async def move(name: str, target: str | None) -> None:
            while True:
                attempts[name] = attempts.get(name, 0) + 1
                async with sem:
                    why = await self._move_off(name, host, target, warnings)
                if why is None:
                    done.append(name)
                    break
                n = attempts[name]
                wait = policy.backoff(n)
                if n >= policy.attempts or time.monotonic() + wait > deadline:
                    failed[name] = why if n == 1 else f"{why} (tried {n} times)"
                    break
                log.warning("maintenance of %s: moving %s failed (%s); attempt %d in %.0f s", host, name, why,
                            n + 1, wait)  # fmt: skip
                await ctx.progress(len(done) / max(total, 1), f"{name}: move {n} failed, again in {wait:.0f} s")
                await asyncio.sleep(wait)
                target = None  # the next attempt goes where the scheduler puts it now
            await ctx.progress(len(done) / max(total, 1), f"{len(done)}/{total} VMs moved off {host}")

        await ctx.progress(0.0, f"moving {total} VMs off {host}")
        await asyncio.gather(*(move(n, t) for n, t in plan.items()))
        if failed:
            first = next(iter(failed.items()))
            raise HypervisorError(
                f"{len(failed)} of {total} VMs could not leave {host} (e.g. {first[0]}: {first[1]}); "
                f"it stays in maintenance",
                failed=failed,
                moved=sorted(done),
                **({"warnings": warnings} if warnings else {}),
            )
        retried = {n: a for n, a in sorted(attempts.items()) if a > 1}
        return {
            "host": host,
            "moved": sorted(done),
            "plan": plan,
            **({"retried": retried} if retried else {}),
            **({"warnings": warnings} if warnings else {}),
        }

    async def _move_off(self, name: str, host: str, target: str | None, warnings: list[str]) -> str | None:
        """One attempt to migrate ``name`` off ``host``: None once it no longer runs there, else why not."""
        try:
            rec = await self.vms.records.get(name)
        except NotFound:
            return None  # deleted meanwhile: nothing to move
        if rec.host != host or rec.state not in _RUNNING:
            return None  # moved or stopped meanwhile
        try:
            try:
                job = await self.migrate(name, to=target)
            except InsufficientResources:
                if target is None:
                    raise
                job = await self.migrate(name)  # the planned host filled up: wherever there is room now
            rec_job = await self.vms.jobs.wait(job.id, MIGRATION_TIMEOUT_S + 60)
        except KasouError as e:
            return e.message
        if rec_job.error:
            return str(rec_job.error.get("message", "failed"))
        warnings.extend((rec_job.result or {}).get("warnings", []))
        return None


_RUNNING = (VMState.RUNNING, VMState.PAUSED, VMState.MIGRATING, VMState.STARTING, VMState.SHUTTING_DOWN)
