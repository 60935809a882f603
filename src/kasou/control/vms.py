"""The VM operations of the control plane, each in Ganeti's phases.

1. check the arguments (pure, :mod:`kasou.model`),
2. check the prerequisites against the store and the hosts, with no side
   effect: a refusal here is an immediate 4xx and changes nothing,
3. claim the VM (a compare-and-swap on its record, so two operations never
   run on one VM at once),
4. execute as a job, whose failure path undoes what it did.

A background reconciler compares every record with what its host's agent
reports, so a VM whose QEMU died is ``crashed`` and in the ledger within
seconds, with no one asking.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import Awaitable, Callable, Collection, Iterable
from typing import Any

from kasou.config import HaTimes
from kasou.control import scheduler, shutdown, vm_create
from kasou.control.backups import UNKNOWN_DEPARTMENT, Backups
from kasou.control.base import VMJobRunner, VMRecords, VMView
from kasou.control.bulk import Bulk
from kasou.control.desktops import Desktops
from kasou.control.devices import Devices
from kasou.control.events import Events
from kasou.control.ha import HOST_CHECK_EVERY_S, HaManager
from kasou.control.hosts import Agents, maintenance_hosts
from kasou.control.imports import Imports
from kasou.control.jobs import JobContext, Jobs
from kasou.control.ledger import Ledger
from kasou.control.media import Media
from kasou.control.mirrors import Mirrors
from kasou.control.networks import Networks
from kasou.control.onboot import OnBoot
from kasou.control.pools import Pools
from kasou.control.records import JobRecord, LedgerEntry, LedgerEvent, VMRecord, vm_key
from kasou.control.replication import Replication
from kasou.control.snapshots import Snapshots
from kasou.control.vm_view import vm_view
from kasou.errors import (
    AgentUnavailable,
    AlreadyExists,
    Conflict,
    InsufficientResources,
    InvalidSpec,
    KasouError,
    NotFound,
    OperationTimeout,
    StoreConflict,
    WrongState,
)
from kasou.hypervisor.base import LaunchSpec, RuntimeInfo, RuntimeState
from kasou.model.selection import changed_tags
from kasou.model.spec import VMCreate, VMUpdate
from kasou.model.state import ACTIVE_STATES, Action, VMState, check_action

log = logging.getLogger(__name__)

DEFAULT_SHUTDOWN_TIMEOUT = 60.0
RECONCILE_EVERY_S = 2.0
# How long a read (vm show/list, the reconciler) waits for one host's report of its VMs. An agent
# that takes longer (a host cut off before its lease expires, a wedged agent) counts as unreachable
# for that read: the CLI's 30 s and the reconciler's round must not wait on it.
RUNTIME_READ_S = 10.0
POOL_CHECK_EVERY_TICKS = 15  # pools are measured every 30 s (a walk of their files)


class VMService:
    def __init__(
        self,
        store: Any,
        agents: Agents,
        jobs: Jobs,
        ledger: Ledger,
        shutdown_timeout: float = DEFAULT_SHUTDOWN_TIMEOUT,
        vcpu_ratio: float = scheduler.DEFAULT_VCPU_RATIO,
        ha_times: HaTimes | None = None,
    ) -> None:
        self.store = store
        self.agents = agents
        self.jobs = jobs
        self.ledger = ledger
        self.shutdown_timeout = shutdown_timeout
        self.vcpu_ratio = vcpu_ratio
        self.records = VMRecords(store)
        self.runner = VMJobRunner(self.records, jobs)
        self.ha = HaManager(self, ha_times or HaTimes())
        self.replication = Replication(self)
        self.snapshots = Snapshots(self)
        self.networks = Networks(store)
        self.events = Events(store)
        self.backups = Backups(self)  # kasou.control.backups
        self.pools = Pools(self)
        self.mirrors = Mirrors(self)
        self.desktops = Desktops(self)  # kasou.control.desktops: desktop pools
        self.imports = Imports(self)  # kasou.control.imports: vm import and export
        self.media = Media(self)  # kasou.control.media: the CD drive
        self.devices = Devices(self)  # kasou.control.devices: sizes, disks and NICs that change
        self.onboot = OnBoot(self)  # kasou.control.onboot: VMs started when their host boots
        self.bulk = Bulk(self)  # kasou.control.bulk: start, shut down, stop many VMs as one job
        #: Work of other services done at every reconcile round of the leader (the balancer's recommend and
        #: automatic modes); each checks its own interval.
        self.periodic: list[Callable[[], Awaitable[None]]] = []
        self._ticks = 0
        self._reconciler: asyncio.Task[None] | None = None
        self._host_checker: asyncio.Task[None] | None = None

    # -- the live view ---------------------------------------------------------------

    async def _runtime(self, host: str | None) -> dict[str, RuntimeInfo] | None:
        """What ``host`` reports of its VMs; None if it cannot say within ``RUNTIME_READ_S``."""
        try:
            async with asyncio.timeout(RUNTIME_READ_S):
                return {i.name: i for i in await self.agents.get(host).list()}
        except (AgentUnavailable, OperationTimeout, TimeoutError):
            return None

    async def _runtimes(self, hosts: Iterable[str | None]) -> dict[str | None, dict[str, RuntimeInfo] | None]:
        """Every host's report at once: one host that hangs costs a read ``RUNTIME_READ_S``, not more."""
        order = list(hosts)
        return dict(zip(order, await asyncio.gather(*(self._runtime(h) for h in order)), strict=True))

    def view(
        self, rec: VMRecord, rt: RuntimeInfo | None, reachable: bool, maintenance: set[str] | None = None
    ) -> VMView:
        blocked = self.ha.restart_blocker(rec, maintenance or set()) if rec.ha and rec.state in ACTIVE_STATES else None
        return vm_view(rec, rt, reachable, blocked)

    async def list_all(self) -> list[VMView]:
        await self.agents.refresh()
        records = await self.records.all()
        runtime = await self._runtimes({r.host for r in records})
        maintenance = await maintenance_hosts(self.store)
        out = []
        for rec in records:
            rt_host = runtime.get(rec.host)
            rt = rt_host.get(rec.name) if rt_host is not None else None
            if rt_host is not None:
                rec = await self._reconcile(rec, rt)
            out.append(self.view(rec, rt, rt_host is not None, maintenance))
        return out

    async def get(self, name: str) -> VMView:
        await self.agents.refresh()
        rec = await self.records.get(name)
        rt_host = await self._runtime(rec.host)
        rt = rt_host.get(name) if rt_host is not None else None
        if rt_host is not None:
            rec = await self._reconcile(rec, rt)
        return self.view(rec, rt, rt_host is not None, await maintenance_hosts(self.store))

    async def _reconcile(self, rec: VMRecord, rt: RuntimeInfo | None) -> VMRecord:
        """Bring a record in line with its host's report, when no job holds the VM."""
        if rec.job is not None:
            return rec
        gone = rt is None or rt.state in (RuntimeState.EXITED, RuntimeState.CRASHED)
        if rec.state in ACTIVE_STATES and gone:
            crashed = rt is None or rt.state == RuntimeState.CRASHED
            reason = (rt.exit_reason if rt else None) or "its QEMU process is gone"
            new_state = VMState.CRASHED if crashed else VMState.STOPPED
            if not await self.records.transition(rec, new_state):
                return rec
            event = LedgerEvent.CRASHED if crashed else LedgerEvent.STOPPED
            detail = reason if crashed else f"the guest powered off ({reason})"
            await self.ledger.record(rec.name, event, rec.host, detail)
            with contextlib.suppress(KasouError):
                await self.agents.get(rec.host).forget(rec.name)
            return await self.records.get(rec.name)
        if rt is None or gone:
            return rec
        if rec.state == VMState.RUNNING and rt.state == RuntimeState.PAUSED:
            if await self.records.transition(rec, VMState.PAUSED):
                await self.ledger.record(rec.name, LedgerEvent.PAUSED, rec.host, "paused by the hypervisor")
        elif rec.state == VMState.PAUSED and rt.state == RuntimeState.RUNNING:
            if await self.records.transition(rec, VMState.RUNNING):
                await self.ledger.record(rec.name, LedgerEvent.RESUMED, rec.host, "resumed by the hypervisor")
        elif rec.state in (VMState.STOPPED, VMState.CRASHED):
            # A process the record does not know of (a start interrupted by a restart): adopt it.
            state = VMState.PAUSED if rt.state == RuntimeState.PAUSED else VMState.RUNNING
            if await self.records.transition(rec, state, started_at=rt.started_at):
                await self.ledger.record(rec.name, LedgerEvent.STARTED, rec.host, "found running on its host")
        else:
            return rec
        return await self.records.get(rec.name)

    async def reconcile_all(self) -> None:
        records = await self.records.all()
        await self.agents.refresh()
        runtimes: dict[str, dict[str, RuntimeInfo]] = {}
        reports = await self._runtimes(sorted({r.host for r in records if r.host} | set(self.agents.names())))
        for host, rt_host in reports.items():
            if host is None or rt_host is None:
                continue
            runtimes[host] = rt_host
            for rec in records:
                if rec.host == host:
                    with contextlib.suppress(NotFound, StoreConflict):
                        await self._reconcile(rec, rt_host.get(rec.name))
            await self._tidy_leftovers(host, rt_host, {r.name: r for r in records})
        await self.ha.tick(runtimes)
        await self.replication.tick(await self.records.all())
        await self.backups.tick()  # due scheduled backups
        await self.mirrors.tick()
        await self.desktops.tick()  # ended sessions' desktops returned and reset, K kept pre-started
        await self.onboot.tick(runtimes)  # a host that booted: its onboot VMs started in order
        for periodic in self.periodic:  # the balancer's rounds (kasou.control.balance)
            try:
                await periodic()
            except KasouError as e:
                log.warning("%s", e.message)
        self._ticks += 1
        if self._ticks % POOL_CHECK_EVERY_TICKS == 1:
            await self.pools.tick()

    async def _tidy_leftovers(self, host: str, rt_host: dict[str, RuntimeInfo], records: dict[str, VMRecord]) -> None:
        """Forget dead QEMUs a host still reports for VMs that now live elsewhere (fenced, failed over)."""
        for name, rt in rt_host.items():
            rec = records.get(name)
            if rec is None or rec.host == host or rec.job is not None:
                continue
            if rt.state in (RuntimeState.EXITED, RuntimeState.CRASHED):
                with contextlib.suppress(KasouError):
                    await self.agents.get(host).forget(name)
                    log.info("forgot the dead copy of %s on %s (the VM runs on %s)", name, host, rec.host)
            elif rt.state != RuntimeState.INCOMING:
                log.error("VM %s runs on %s but its record says %s: not touching it", name, host, rec.host)

    async def _host_check_loop(self) -> None:
        while True:
            try:
                await self.ha.check_hosts()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("host check failed")
            await asyncio.sleep(HOST_CHECK_EVERY_S)

    async def _reconcile_loop(self) -> None:
        while True:
            try:
                await self.reconcile_all()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("reconcile failed")
            await asyncio.sleep(RECONCILE_EVERY_S)

    async def startup(self) -> None:
        """After a restart of the control plane: fail stale jobs, release and tidy their VMs."""
        await self.jobs.recover()
        for rec in await self.records.all():
            if rec.state == VMState.CREATING:
                await self.undo_create(rec.name, rec.host, [d.path for d in rec.disks if d.path])
            elif rec.job is not None:
                state = VMState.STOPPED if rec.state == VMState.DELETING else rec.state
                await self.records.set(rec.name, job=None, state=state)
            if any(s.state == "taking" for s in rec.snapshots):
                with contextlib.suppress(KasouError):
                    await self.snapshots.recover(await self.records.get(rec.name))
        self._reconciler = asyncio.create_task(self._reconcile_loop(), name="reconciler")
        self._host_checker = asyncio.create_task(self._host_check_loop(), name="ha-host-check")

    async def suspend(self) -> None:
        """Stop the background work (this control plane is no longer the leader)."""
        for task in (self._reconciler, self._host_checker):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._reconciler = self._host_checker = None
        await self.onboot.close()

    async def close(self) -> None:
        await self.suspend()
        await self.jobs.close()

    # -- hosts and placement ---------------------------------------------------------

    async def host_loads(self, exclude: str | None = None) -> list[scheduler.HostLoad]:
        """Every host that is up, with what its running VMs use (``exclude``: leave one VM out)."""
        await self.agents.refresh()
        records = await self.records.all()
        maintenance = await maintenance_hosts(self.store)
        loads = []
        for host in self.agents.names():
            try:
                info = await self.agents.get(host).host_info()
            except (AgentUnavailable, OperationTimeout):
                continue
            load = scheduler.HostLoad(host, info.cpus, info.memory_total_mib, schedulable=host not in maintenance)
            for r in records:
                if r.host == host and r.name != exclude and r.state in ACTIVE_STATES:
                    load.add(r.memory_mib, r.vcpus, r.anti_affinity)
            loads.append(load)
        return loads

    async def check_fits_some_host(self, vcpus: int, memory_mib: int) -> list[scheduler.HostLoad]:
        loads = await self.host_loads()
        if not loads:
            raise AgentUnavailable("no host agent answers; is kasou up?")
        most_cpus = max(loads, key=lambda h: h.cpus)
        if vcpus > most_cpus.cpus:
            raise InvalidSpec(
                f"vcpus {vcpus} is more than any host has ({most_cpus.name}: {most_cpus.cpus} CPUs)",
                field="vcpus",
            )
        biggest = max(loads, key=lambda h: h.memory_capacity_mib)
        if memory_mib + scheduler.VM_OVERHEAD_MIB > biggest.memory_capacity_mib:
            raise InvalidSpec(
                f"memory_mib {memory_mib} is more than any host can give a VM "
                f"({biggest.name}: {biggest.memory_capacity_mib - scheduler.VM_OVERHEAD_MIB} MiB)",
                field="memory_mib",
            )
        return loads

    async def admit(self, rec: VMRecord, ha_check: bool = True) -> None:
        """Refuse a start the VM's host cannot carry (memory is never overcommitted), or one that
        would leave too little room to restart some host's HA VMs (``ha_check``; not for HA's own restarts)."""
        all_loads = await self.host_loads(exclude=rec.name)
        loads = {h.name: h for h in all_loads}
        host = loads.get(rec.host or "")
        if host is None:
            raise AgentUnavailable(f"the agent of host {rec.host} does not answer")
        why = scheduler.why_not(host, scheduler.Request.of(rec), self.vcpu_ratio)
        if why is not None:
            raise InsufficientResources(f"cannot start VM {rec.name!r}: {why}")
        info = await self.agents.get(rec.host).host_info()
        need = rec.memory_mib + scheduler.VM_OVERHEAD_MIB
        if need > info.memory_available_mib:
            raise InsufficientResources(
                f"cannot start VM {rec.name!r}: host {rec.host} has "
                f"{info.memory_available_mib} MiB available right now, the VM needs {need} MiB"
            )
        if ha_check and rec.host is not None:
            await self.ha.check_admission(rec, rec.host, all_loads)

    # -- settings --------------------------------------------------------------------

    async def update(self, name: str, upd: VMUpdate) -> VMView:
        """Change a VM's HA setting, restart priority, description, department, vCPUs or memory (next start)."""
        rec = await self.records.get(name)
        changes = upd.model_dump(exclude_none=True, exclude={"vcpus", "memory_mib", "tags", "add_tags", "remove_tags"})
        if upd.startup is not None:
            changes["startup"] = upd.startup
        await self.devices.check_sizes(rec, upd)  # vCPUs and memory: applied at its next start
        if changes.get("department") == "":
            changes["department"] = None
        if "department" in changes and changes["department"] != rec.department:
            await self.networks.check_department({n.network for n in rec.nics}, changes["department"])
        if upd.ha and not rec.ha:
            self.ha.check_setting(rec)  # in a cluster: refused for a VM whose disk no other host reaches
        if upd.ha and not rec.ha and rec.state in ACTIVE_STATES and rec.host is not None:
            await self.ha.check_admission(rec.model_copy(update={"ha": True}), rec.host)
        await self.records.update(name, lambda r: r.model_copy(update={
            **changes, **self.devices.apply_sizes(r, upd), "tags": changed_tags(r.tags, upd.tags, upd.add_tags,
                                                                                upd.remove_tags)}))  # fmt: skip
        return await self.get(name)

    # -- create ----------------------------------------------------------------------

    async def create(self, spec: VMCreate, scope: Collection[str] | None = None) -> tuple[VMView, JobRecord]:
        """Define a VM (and start it if asked). Returns at once; the disks are made by a job (see vm_create).

        ``scope``: the departments the asking user is confined to (a vendor's), None if not confined."""
        return await vm_create.create(self, spec, scope)

    async def check_name_free(self, name: str, department: str | None, scope: Collection[str] | None) -> None:
        """Refuse a new VM's name if a VM holds it, or if backups of an earlier VM of another department
        still carry it. To a user confined to ``scope``, a name held by what they cannot see is only "not
        available" (409 ``conflict``), the same whether a VM or backups hold it and whoever's they are."""
        e = await self.store.get(vm_key(name))
        if e is not None:
            if scope is not None and VMRecord.model_validate(e.value).department not in scope:
                raise Conflict(name_unavailable(name))
            raise AlreadyExists(f"a VM named {name!r} already exists")
        owners = await self.backups.departments_of_name(name)
        if scope is None:
            owners.discard(UNKNOWN_DEPARTMENT)  # generations that do not say: only confined users are kept off
        others = sorted({d or "" for d in owners} - {department or ""})
        if others:
            if scope is not None and not set(others) <= set(scope):
                raise Conflict(name_unavailable(name))
            raise Conflict(
                f"the name {name!r} has backups of an earlier VM of department {others[0] or '(none)'!r}; a VM of "
                "another department cannot take it (choose another name)"
            )

    async def check_group(self, group: str | None, department: str | None, scope: Collection[str] | None) -> None:
        """A department-scoped user's VM joins only an anti-affinity group of its own department (a group
        belongs to the department of its first member); to them another department's group is "not available"."""
        if group is None or scope is None:
            return
        members = sorted((r for r in await self.records.all() if r.anti_affinity == group), key=lambda r: r.created_at)
        if not members or members[0].department == department:
            return
        owner = members[0].department
        if owner is not None and owner in scope:
            raise Conflict(
                f"anti-affinity group {group!r} belongs to department {owner!r}; a VM of department "
                f"{department!r} cannot join it (choose another group name)"
            )
        raise Conflict(f"anti-affinity group {group!r} is not available; choose another group name")

    @staticmethod
    def new_job_id() -> str:
        return _job_id()

    async def undo_create(self, name: str, host: str | None, disk_paths: list[str]) -> None:
        """Leave nothing of a failed create (or restore): no process, no disk, no record, no ledger."""
        await vm_create.undo_create(self, name, host, disk_paths)

    # -- start and the power actions -------------------------------------------------

    def launch_spec(self, rec: VMRecord) -> LaunchSpec:
        return vm_create.launch_spec(rec)

    async def start_now(
        self, rec: VMRecord, event: LedgerEvent = LedgerEvent.STARTED, detail: str = "", admit_ha: bool = True
    ) -> None:
        rec = await self.devices.at_start(rec)  # sizes set while it ran; its hot-plug ports
        await self.admit(rec, ha_check=admit_ha)
        await self.records.set(rec.name, state=VMState.STARTING)
        try:
            info = await self.agents.get(rec.host).start(self.launch_spec(rec))
        except BaseException:
            await self.records.set(rec.name, state=rec.state if rec.state != VMState.STARTING else VMState.STOPPED)
            raise
        await self.records.set(
            rec.name, state=VMState.RUNNING, started_at=info.started_at or time.time(), last_error=None,
            ha_armed=rec.ha,
        )  # fmt: skip
        await self.mirrors.started(rec.name)
        await self.ledger.record(rec.name, event, rec.host, detail)

    async def action(self, name: str, action: Action, timeout: float | None = None) -> JobRecord:
        """start, shutdown, stop, reboot, pause or resume, as a job."""
        if action in (Action.DELETE, Action.TEMPLATE, Action.MIGRATE, Action.EXPORT, Action.MEDIA):
            raise InvalidSpec(f"{action.value} is not a power action")
        job_id = _job_id()
        rec = await self.records.get(name)
        if action == Action.STOP and rec.job is not None:
            return await self._preempting_stop(rec, job_id)
        if action == Action.START:
            check_action(name, action, rec.state)
            await self.admit(rec)
        rec = await self.runner.claim(name, action, job_id)
        fn = {
            Action.START: self._job_start,
            Action.SHUTDOWN: self._job_shutdown,
            Action.STOP: self._job_stop,
            Action.REBOOT: self._job_reboot,
            Action.PAUSE: self._job_pause,
            Action.RESUME: self._job_resume,
        }[action]
        limit = self.shutdown_timeout if timeout is None else timeout

        async def run(ctx: JobContext) -> dict[str, Any]:
            extra = await fn(ctx, rec, limit)
            return {"vm": name, "state": (await self.records.get(name)).state.value, **(extra or {})}

        return await self.runner.submit(action.value, name, run, job_id)

    async def _preempting_stop(self, rec: VMRecord, job_id: str) -> JobRecord:
        """A stop while a graceful shutdown waits: pull the plug; the shutdown job records the stop."""
        busy = await self.jobs.get(rec.job or "")
        if busy.kind != "shutdown" or busy.done:
            raise WrongState(f"VM {rec.name!r} is busy with job {busy.id} ({busy.kind})", job=busy.id)

        async def run(ctx: JobContext) -> dict[str, Any]:
            await self.agents.get(rec.host).action(rec.name, "stop")
            return {"vm": rec.name, "preempted": busy.id}

        return await self.jobs.submit("stop", rec.name, run, job_id=job_id)

    async def _job_start(self, ctx: JobContext, rec: VMRecord, _t: float) -> None:
        await ctx.progress(0.2, "starting QEMU")
        await self.start_now(rec)

    async def _job_shutdown(self, ctx: JobContext, rec: VMRecord, timeout: float) -> dict[str, Any]:
        return await shutdown.run(self, ctx, rec, timeout)

    async def stopped(self, rec: VMRecord, detail: str) -> None:
        with contextlib.suppress(KasouError):
            await self.agents.get(rec.host).forget(rec.name)
        await self.records.set(rec.name, state=VMState.STOPPED, started_at=None)
        await self.ledger.record(rec.name, LedgerEvent.STOPPED, rec.host, detail)

    async def _job_stop(self, ctx: JobContext, rec: VMRecord, _t: float) -> None:
        await ctx.progress(0.2, "stopping")
        await self.mirrors.before_stop(rec)
        await self.agents.get(rec.host).action(rec.name, "stop")
        await self.stopped(rec, "stopped at once")

    async def _job_reboot(self, ctx: JobContext, rec: VMRecord, _t: float) -> None:
        await ctx.progress(0.2, "resetting")
        await self.agents.get(rec.host).action(rec.name, "reset")
        await self.ledger.record(rec.name, LedgerEvent.RESTARTED, rec.host, "reset by request")

    async def _job_pause(self, ctx: JobContext, rec: VMRecord, _t: float) -> None:
        await self.agents.get(rec.host).action(rec.name, "pause")
        await self.records.set(rec.name, state=VMState.PAUSED)
        await self.ledger.record(rec.name, LedgerEvent.PAUSED, rec.host)

    async def _job_resume(self, ctx: JobContext, rec: VMRecord, _t: float) -> None:
        await self.agents.get(rec.host).action(rec.name, "resume")
        await self.records.set(rec.name, state=VMState.RUNNING)
        await self.ledger.record(rec.name, LedgerEvent.RESUMED, rec.host)

    # -- delete and templates --------------------------------------------------------

    async def delete(self, name: str, keep_disks: bool = False, force: bool = False) -> JobRecord:
        rec = await self.records.get(name)
        clones = [r.name for r in await self.records.all() if r.template == name]
        if clones:
            raise WrongState(f"template {name!r} still has linked clones: {', '.join(sorted(clones))}")
        if rec.job is None and not (force and rec.state in ACTIVE_STATES):
            check_action(name, Action.DELETE, rec.state)
        job_id = _job_id()

        def apply(r: VMRecord) -> VMRecord:
            if r.job is not None:
                raise WrongState(f"VM {name!r} is busy with job {r.job}; try again when it ends", job=r.job)
            if not (force and r.state in ACTIVE_STATES):
                check_action(name, Action.DELETE, r.state)
            return r.model_copy(update={"job": job_id})

        await self.records.update(name, apply)

        async def run(ctx: JobContext) -> dict[str, Any]:
            cur = await self.records.get(name)
            agent = self.agents.get(cur.host)
            if cur.state in ACTIVE_STATES:
                await ctx.progress(0.1, "stopping")
                await agent.action(name, "stop")
                await self.ledger.record(name, LedgerEvent.STOPPED, cur.host, "stopped to be deleted")
            await self.records.set(name, state=VMState.DELETING)
            await ctx.progress(0.4, "removing disks")
            await self.replication.drop(cur.model_copy(update={"state": VMState.DELETING}))
            with contextlib.suppress(NotFound):
                await agent.forget(name)
            if not keep_disks:
                await self.snapshots.delete_files(cur)
                for p in [d.path for d in cur.disks] + [cur.nvram, cur.tpm_state]:  # and its firmware state
                    if p:
                        await agent.delete_disk(p)
                for p in self.mirrors.files(cur):  # second copies, and copies that failed
                    with contextlib.suppress(KasouError):
                        await agent.delete_disk(p)
            await self.store.delete(vm_key(name))
            await self.ledger.forget(name)
            return {
                "vm": name,
                "deleted": True,
                "kept_disks": [d.path for d in cur.disks] if keep_disks else [],
            }

        return await self.runner.submit("delete", name, run, job_id)

    async def make_template(self, name: str) -> VMView:
        def apply(r: VMRecord) -> VMRecord:
            if r.job is not None:
                raise WrongState(f"VM {name!r} is busy with job {r.job}", job=r.job)
            check_action(name, Action.TEMPLATE, r.state)
            if r.snapshots:
                raise WrongState(f"VM {name!r} has snapshots; delete them before making it a template")
            if any(d.mirror for d in r.disks):
                raise WrongState(f"VM {name!r} has mirrored disks; a template's disk is shared, not mirrored")
            return r.with_state(VMState.TEMPLATE)

        await self.records.update(name, apply)
        return await self.get(name)

    # -- reading ---------------------------------------------------------------------

    async def console_log(self, name: str, max_bytes: int = 65536) -> str:
        """The VM's serial console output: its own only (a log an earlier VM of that name left is not shown)."""
        rec = await self.records.get(name)
        return await self.agents.get(rec.host).console(name, max_bytes, uuid=rec.uuid)

    async def history(self, name: str) -> list[LedgerEntry]:
        """The ledger of the VM that holds the name now."""
        return await self.ledger.history(name, await self.records.get(name))


def name_unavailable(name: str) -> str:
    """What a department-scoped user hears of a name held by what they may not see (it reveals nothing)."""
    return f"the name {name!r} is not available; choose another name"


def _job_id() -> str:
    return "j" + secrets.token_hex(5)
