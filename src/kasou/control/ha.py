"""High availability: restart the VMs of a failed host elsewhere, restart dead QEMUs, reset hung guests.

Runs with the control plane's leader, on every reconcile tick.

*Host failure.* A host is failed when its lease record ``hosts/<name>`` is gone
(its guard could not renew it for a whole TTL). Its guard killed its HA VMs at
least ``fence_margin_s`` before the lease could expire (:mod:`kasou.agent.guard`);
this side waits another ``fence_margin_s`` after it first saw the record gone,
then restarts them, highest priority first, each on the host the scheduler
picks (the placements of one round count against each other). A VM needs its
disk where it restarts: shared disks are seen by every host, a replicated VM
restarts on its replica's host. So in a cluster ``ha`` is refused for a VM whose
disk only its own host reaches (:meth:`HaManager.check_storage`), and a VM shows
``ha_armed`` only while a restart elsewhere is possible now
(:meth:`HaManager.restart_blocker`). On a single host HA means a restart on that
host (after a crash, a hang, or the host's own restart).

*Operator events* (critical, :mod:`kasou.control.events`): a host going down; an
HA VM that cannot be restarted (and why: its disk is local to the failed host, no
host has room, the restart failed); a VM left on the failed host with nothing to
restart it (not HA). Each is raised once and over when the host returns or the
VM is restarted.

*VM monitoring.* An HA VM whose QEMU died on a host that is up (it is
``crashed`` in its record) is started again on its host; an HA VM whose guest
sent no heartbeat for ``heartbeat_timeout_s`` (it did before: it is hung) is
reset; a guest without the heartbeat (a real OS) whose QEMU guest agent answered
and then fell silent for twice that long is reset too. Each such repair is in the ledger.

*Admission (N+1).* While any VM is HA-protected, a start that would leave too
little free capacity to restart the HA VMs of any one host on the others is
refused, with the numbers.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from typing import TYPE_CHECKING, Any, Protocol

from kasou.config import HaTimes
from kasou.control import audit, scheduler
from kasou.control.base import VMControl
from kasou.control.media import has_iso
from kasou.control.records import LedgerEvent, VMRecord
from kasou.errors import InsufficientResources, InvalidSpec, KasouError, NotFound, StoreConflict
from kasou.hypervisor.base import RuntimeInfo, RuntimeState
from kasou.model.state import ACTIVE_STATES, VMState

if TYPE_CHECKING:
    from kasou.control.hosts import Agents
    from kasou.control.pools import Pools
    from kasou.control.replication import Replication

log = logging.getLogger(__name__)
#: A guest watched through its guest agent (no heartbeat) is hung after this many heartbeat limits of silence.
AGENT_SILENCE_FACTOR = 2

RESTART_BACKOFF_S = 10.0  # between two attempts to restart one VM that failed to start
HOST_CHECK_EVERY_S = 0.5  # how often the leader looks for hosts whose lease is gone


def n_plus_one_violation(
    loads: list[scheduler.HostLoad], placed: dict[str, list[scheduler.Request]], vcpu_ratio: float
) -> str | None:
    """Why the HA VMs of some host could not all restart on the others if it failed, or None.

    ``loads``: every up host with all its running VMs (and any VM about to start) counted;
    ``placed``: the HA VMs on each host.
    """
    if len(loads) < 2:
        return None  # one host: nowhere to fail over to, nothing to keep free
    for failed in loads:
        victims = placed.get(failed.name, [])
        if not victims:
            continue
        others = [dataclasses.replace(h, groups=set(h.groups)) for h in loads if h.name != failed.name]
        placer = scheduler.Placer(others, vcpu_ratio)
        for req in sorted(victims, key=lambda r: -r.memory_mib):
            try:
                placer.place(req)
            except InsufficientResources as e:
                mib = sum(r.memory_mib + scheduler.VM_OVERHEAD_MIB for r in victims)
                vcpus = sum(r.vcpus for r in victims)
                return (
                    f"the HA VMs of {failed.name} ({_n(len(victims), 'VM')}: {_n(vcpus, 'vCPU')}, {mib} MiB) "
                    f"could not all restart on the other hosts if it failed: {e.message}"
                )
    return None


WAY_OUT = (
    "give it a disk another host reaches: --replicated (storage: replicated, a synchronous copy on a second host) "
    "or --shared (storage: shared, or a pool every host sees)"
)


def restarts_elsewhere(agents: Agents) -> bool:
    """Whether HA means a restart on another host here: in a cluster (more than one host), not on a single host."""
    return agents.clustered or len(agents.known()) > 1


def _n(count: int, what: str) -> str:
    return f"{count} {what}{'' if count == 1 else 's'}"


class HaVMs(VMControl, Protocol):
    """What HA uses of :class:`kasou.control.vms.VMService`."""

    pools: Pools
    replication: Replication


class HaManager:
    def __init__(self, vms: HaVMs, times: HaTimes, clock: Any = time.monotonic) -> None:
        self.vms = vms
        self.times = times
        self.clock = clock
        self.gone_since: dict[str, float] = {}  # host -> when this control plane first saw it without lease
        self._reset_at: dict[str, float] = {}
        self._tried_at: dict[str, float] = {}
        self._waiting_note: dict[str, str] = {}
        self._host_up: dict[str, bool] = {}  # host -> up when last looked at (host events on a change)
        self._raised: set[str] = set()  # event conditions this control plane raised and has not cleared

    # -- where a restart is possible --------------------------------------------------------

    async def check_storage(self, name: str, storage: str, pools: list[str], template: str | None) -> None:
        """Refuse ``ha`` for a new VM whose disk only its own host would reach (in a cluster)."""
        if not restarts_elsewhere(self.vms.agents) or storage == "replicated":
            return
        if storage == "shared" and template is None:
            return
        if template is None:
            try:
                records = [await self.vms.pools.get_record(p) for p in pools]
            except NotFound:
                return  # the create refuses the unknown pool itself
            if records and all(p.shared for p in records):
                return
        what = "a linked clone's disk is local to its template's host" if template else "its disk would be local"
        raise InvalidSpec(
            f"HA restarts VM {name!r} on another host when its host fails, but {what}, so no other host "
            f"could start it: {WAY_OUT}",
            field="ha",
        )

    def check_setting(self, rec: VMRecord) -> None:
        """Refuse turning ``ha`` on for a VM whose disk only its own host reaches (in a cluster)."""
        if not restarts_elsewhere(self.vms.agents) or rec.replicated or all(d.shared for d in rec.disks):
            return
        raise InvalidSpec(
            f"HA restarts VM {rec.name!r} on another host when its host fails, but its disk is local to "
            f"{rec.host}, so no other host could start it; its disk cannot be moved there in place: create the VM "
            f"again (or restore a backup of it) and {WAY_OUT}",
            field="ha",
        )

    def restart_blocker(self, rec: VMRecord, maintenance: set[str]) -> str | None:
        """Why HA could not restart ``rec`` on another host if its host failed now, or None if it could."""
        agents = self.vms.agents
        if not rec.ha:
            return "HA is off"
        if not restarts_elsewhere(agents):
            return "kasou runs on one host: HA restarts it on this host when its QEMU dies or its guest hangs"
        if not rec.ha_armed:
            return "its QEMU was started before HA was set: HA protects it from its next start or migration"
        if any(not d.shared for d in rec.disks):
            rep = rec.replica
            if not rec.replicated:
                return f"its disk is local to {rec.host}"
            if rep is None or rep.host == rec.host:
                return "its disk has no replica on another host yet"
            if not agents.is_up(rep.host):
                return f"the host of its disk replica, {rep.host}, is down"
            if rep.state != "in_sync":
                return f"its disk replica on {rep.host} is {rep.state}"
            return None
        if not any(h != rec.host and h not in maintenance for h in agents.names()):
            return "no other host is up and out of maintenance"
        return None

    # -- operator events --------------------------------------------------------------------

    async def _raise(self, key: str, kind: str, subject: str, message: str) -> None:
        if key in self._raised:
            return
        self._raised.add(key)
        await self.vms.events.raise_once(key, kind, subject, message, "critical")

    async def _clear(self, key: str, kind: str | None = None, message: str | None = None) -> None:
        self._raised.discard(key)
        await self.vms.events.clear(key, kind, message)

    async def _host_events(self, up: set[str], known: set[str]) -> None:
        """A host that went down is a critical event; one that came back ends it (and its VMs' events)."""
        for host in sorted(known):
            is_up = host in up
            if self._host_up.get(host) == is_up:
                continue
            self._host_up[host] = is_up
            if not is_up:
                await self._raise(
                    f"host-down/{host}", "host_down", f"host/{host}",
                    f"host {host} is down: its cluster lease expired (power, crash or network cut); HA restarts "
                    "its HA VMs elsewhere, its other VMs are out of reach until it returns",
                )  # fmt: skip
            else:
                await self._clear(f"host-down/{host}", "host_up", f"host {host} is up again")
                for key in await self.vms.events.active_keys(f"vm-left/{host}/"):
                    await self._clear(key)

    async def _left_behind(self, records: list[VMRecord], due: set[str], restarting: set[str]) -> None:
        """Every VM on a failed host that nothing restarts elsewhere is a critical event (HA VMs: _cannot_restart)."""
        for r in records:
            if r.host not in due or r.state not in ACTIVE_STATES or r.name in restarting or r.job is not None:
                continue
            if r.ha and r.ha_armed:
                continue  # HA restarts it, or says why it cannot
            why = "it is not HA" if not r.ha else "HA was set after it started (its host could not fence it)"
            await self._raise(
                f"vm-left/{r.host}/{r.name}", "vm_host_down", f"vm/{r.name}",
                f"VM {r.name} was {r.state.value} on host {r.host}, which is down; {why}, so nothing restarts it "
                f"elsewhere: it is out of reach until {r.host} returns",
            )  # fmt: skip

    # -- admission ----------------------------------------------------------------------------

    async def check_admission(self, rec: VMRecord, host: str, loads: list[scheduler.HostLoad] | None = None) -> None:
        """Refuse starting ``rec`` on ``host`` if the HA VMs of some host could no longer fail over.
        ``loads``: every up host's load without ``rec`` (read here if not given); it is not changed."""
        records = await self.vms.records.all()
        if not rec.ha and not any(r.ha and r.state in ACTIVE_STATES for r in records):
            return
        if loads is None:
            loads = await self.vms.host_loads(exclude=rec.name)
        loads = [dataclasses.replace(h, groups=set(h.groups)) for h in loads]
        target = next((h for h in loads if h.name == host), None)
        if target is None:
            return
        target.add(rec.memory_mib, rec.vcpus, rec.anti_affinity)
        placed: dict[str, list[scheduler.Request]] = {}
        for r in records:
            if r.ha and r.state in ACTIVE_STATES and r.name != rec.name and r.host:
                placed.setdefault(r.host, []).append(scheduler.Request.of(r))
        if rec.ha:
            placed.setdefault(host, []).append(scheduler.Request.of(rec))
        why = n_plus_one_violation(loads, placed, self.vms.vcpu_ratio)
        if why is not None:
            raise InsufficientResources(f"cannot start VM {rec.name!r}: HA keeps room for one host's failure: {why}")

    # -- the tick -----------------------------------------------------------------------------

    async def check_hosts(self) -> None:
        """Failed hosts: note when each was first seen without its lease; fail over what is due.
        Runs every ``HOST_CHECK_EVERY_S`` (faster than the reconciler: it bounds the detection time)."""
        await self.vms.agents.refresh()
        await self._check_hosts(await self.vms.records.all())

    async def tick(self, runtimes: dict[str, dict[str, RuntimeInfo]]) -> None:
        """One reconcile round: dead QEMUs, hung guests. ``runtimes``: what each up host reports."""
        records = await self.vms.records.all()
        up = set(self.vms.agents.names())  # failed hosts are check_hosts' business, every 0.5 s
        for r in records:
            if not r.ha or r.job is not None or r.host not in up:
                continue
            if r.state == VMState.CRASHED:
                await self._restart_in_place(r)
            elif r.state == VMState.RUNNING:
                rt = runtimes.get(r.host or "", {}).get(r.name)
                if rt is not None and rt.state == RuntimeState.RUNNING:
                    await self._watch_heartbeat(r, rt)

    async def _check_hosts(self, records: list[VMRecord]) -> None:
        agents = self.vms.agents
        now = self.clock()
        up = set(agents.names())
        vm_hosts = {r.host for r in records if r.host}
        await self._host_events(up, set(agents.known()) | vm_hosts)
        for host in vm_hosts - up:
            self.gone_since.setdefault(host, now)
        for host in list(self.gone_since):
            if host in up:
                del self.gone_since[host]
        due = {h for h, t in self.gone_since.items() if now - t >= self.times.fence_margin_s}
        # A running VM is failed over only if its QEMU was launched HA-protected: only then did the guard fence it.
        victims = [
            r for r in records
            if r.ha and r.ha_armed and r.job is None and r.host in due and r.state in ACTIVE_STATES
        ]  # fmt: skip
        victims += [
            r for r in records
            if r.ha and r.job is None and r.state == VMState.CRASHED and r.host in due
        ]  # fmt: skip
        if victims:
            await self._fail_over(sorted(victims, key=lambda r: (-r.priority, r.name)))
        await self._left_behind(records, due, {r.name for r in victims})

    async def _fail_over(self, victims: list[VMRecord]) -> None:
        loads = await self.vms.host_loads()
        placer = scheduler.Placer([h for h in loads if h.schedulable], self.vms.vcpu_ratio)
        for rec in victims:
            if self.clock() - self._tried_at.get(rec.name, -1e9) < RESTART_BACKOFF_S:
                continue
            failed = rec.host or "?"
            if any(not d.shared for d in rec.disks):
                rep = rec.replica
                if rec.replicated and rep is not None and rep.host != failed and self.vms.agents.is_up(rep.host):
                    if rep.state != "in_sync":
                        log.warning("HA: %s restarts from a replica that was %s", rec.name, rep.state)
                    self._tried_at[rec.name] = self.clock()
                    await self._restart_elsewhere(rec, failed, rep.host, promote=True)
                    continue
                if rec.replicated:
                    why = "its disk replica is not on a host that is up"
                else:
                    why = "its disk is local to the failed host (no replica, not on shared storage)"
                await self._cannot_restart(rec, failed, f"{why}; it restarts when {failed} returns")
                continue
            try:
                target = placer.place(scheduler.Request.of(rec))
            except InsufficientResources as e:
                await self._cannot_restart(rec, failed, f"no host can take it now: {e.message}")
                continue
            self._tried_at[rec.name] = self.clock()
            await self._restart_elsewhere(rec, failed, target.name)

    async def _cannot_restart(self, rec: VMRecord, failed: str, why: str) -> None:
        """Say (once per reason in the log, once per failure as a critical event) why ``rec`` waits."""
        if self._waiting_note.get(rec.name) != why:
            self._waiting_note[rec.name] = why
            log.warning("HA cannot restart %s yet: %s", rec.name, why)
        await self._raise(f"vm-left/{failed}/{rec.name}", "vm_not_restarted", f"vm/{rec.name}",
                          f"HA cannot restart VM {rec.name}, whose host {failed} is down: {why}")  # fmt: skip

    async def _claim(self, rec: VMRecord, still: Any) -> str | None:
        """Hold the VM with a new HA job if no job holds it and ``still(record)`` holds; the job id, or None."""
        job_id = f"ha-{int(time.time() * 1000):x}-{rec.name}"[:40]

        def claim(r: VMRecord) -> VMRecord:
            if r.job is not None or not still(r):
                raise StoreConflict(f"VM {r.name} changed meanwhile")
            return r.model_copy(update={"job": job_id})

        try:
            await self.vms.records.update(rec.name, claim)
        except (StoreConflict, NotFound):
            return None
        return job_id

    async def _restart_elsewhere(self, rec: VMRecord, failed: str, target: str, promote: bool = False) -> None:
        """Claim the VM, note the failure and the fence, and start it on ``target``, as a job."""
        vms = self.vms
        detected_at = time.time() - (self.clock() - self.gone_since.get(failed, self.clock()))
        down_since = detected_at - self.times.lease_ttl_s  # about when the host stopped renewing
        job_id = await self._claim(rec, lambda r: r.host == failed and (r.state in ACTIVE_STATES or
                                                                        r.state == VMState.CRASHED))  # fmt: skip
        if job_id is None:
            return

        async def run(ctx: Any) -> dict[str, Any]:
            if rec.state != VMState.CRASHED:
                await vms.ledger.record(rec.name, LedgerEvent.CRASHED, failed,
                                        f"host {failed} failed: its cluster lease expired")  # fmt: skip
            await vms.ledger.record(
                rec.name, LedgerEvent.FENCED, failed,
                f"host {failed}'s guard kills its HA VMs {self.times.fence_margin_s:g} s before its lease expires",
            )  # fmt: skip
            await audit.record(vms.store, "ha_fence", actor=audit.SYSTEM_HA, target=f"vms/{rec.name}",
                               details={"host": failed, "reason": "its cluster lease expired"})  # fmt: skip
            changes: dict[str, Any] = {}
            if promote:  # the replica's files become the VM's disks on the replica's host
                await ctx.progress(0.2, f"promoting the disk replica on {target}")
                paths = await vms.replication.promote(rec)
                changes = {
                    "disks": [d.model_copy(update={"path": paths.get(d.id, d.path)}) for d in rec.disks],
                    "replica": None,
                }
            dropped = rec.cdrom if rec.cdrom is not None and not await has_iso(vms, target, rec.cdrom) else None
            if dropped is not None:  # it runs without its disc rather than not at all (kasou.control.media)
                changes["cdrom"] = None
            await ctx.progress(0.3, f"starting on {target}")
            moved = await vms.records.set(rec.name, host=target, state=VMState.STOPPED, started_at=None, **changes)
            how = " from its disk replica" if promote else ""
            try:
                await vms.start_now(moved, LedgerEvent.RESTARTED, f"on {target}{how} after host {failed} failed",
                                    admit_ha=False)  # fmt: skip
            except BaseException as e:
                with contextlib.suppress(KasouError):
                    await vms.records.set(rec.name, state=VMState.CRASHED)
                await audit.record(vms.store, "ha_restart", actor=audit.SYSTEM_HA, target=f"vms/{rec.name}", ok=False,
                                   message=str(e)[:300], details={"from": failed, "to": target})  # fmt: skip
                with contextlib.suppress(KasouError):
                    await self._cannot_restart(rec, failed, f"its restart on {target} failed ({str(e)[:200]}); "
                                                            f"HA tries again in {RESTART_BACKOFF_S:g} s")  # fmt: skip
                raise
            down = time.time() - down_since
            await audit.record(vms.store, "ha_restart", actor=audit.SYSTEM_HA, target=f"vms/{rec.name}",
                               details={"from": failed, "to": target, "promoted_replica": promote})  # fmt: skip
            log.warning("HA restarted %s on %s (host %s failed; down about %.0f s)", rec.name, target, failed, down)
            self._waiting_note.pop(rec.name, None)
            await self._clear(f"vm-left/{failed}/{rec.name}")
            await vms.events.emit("vm_restarted", f"vm/{rec.name}",
                                  f"HA restarted VM {rec.name} on {target}{how} after host {failed} failed "
                                  f"(down about {down:.0f} s)")  # fmt: skip
            if dropped is not None:
                await vms.events.emit("vm_cd_dropped", f"vm/{rec.name}",
                                      f"VM {rec.name} runs on {target} with its CD drive empty: host {target} has no "
                                      f"ISO image {dropped!r} (import it there and insert it: kasou vm media insert "
                                      f"{rec.name} {dropped})")  # fmt: skip
            return {"vm": rec.name, "from": failed, "to": target, "down_s": round(down, 1), "detected_at": detected_at}

        await vms.runner.submit("ha-restart", rec.name, run, job_id)

    async def _restart_in_place(self, rec: VMRecord) -> None:
        """An HA VM whose QEMU died on a healthy host: start it there again."""
        if self.clock() - self._tried_at.get(rec.name, -1e9) < RESTART_BACKOFF_S:
            return
        self._tried_at[rec.name] = self.clock()
        vms = self.vms
        job_id = await self._claim(rec, lambda r: r.state == VMState.CRASHED and r.host == rec.host)
        if job_id is None:
            return

        async def run(ctx: Any) -> dict[str, Any]:
            await ctx.progress(0.3, f"starting on {rec.host}")
            await vms.start_now(rec, LedgerEvent.RESTARTED, "its QEMU process had died", admit_ha=False)
            await audit.record(vms.store, "ha_restart", actor=audit.SYSTEM_HA, target=f"vms/{rec.name}",
                               details={"host": rec.host, "why": "its QEMU process had died"})  # fmt: skip
            return {"vm": rec.name, "host": rec.host}

        await vms.runner.submit("ha-restart", rec.name, run, job_id)

    async def _watch_heartbeat(self, rec: VMRecord, rt: RuntimeInfo) -> None:
        """Reset a guest that stopped sending heartbeats (it sent some before, so it is hung).

        A guest without kasou's heartbeat (a real OS) is watched through its guest agent instead, and
        conservatively: only one whose agent answered since the guest started, and has been silent for
        ``AGENT_SILENCE_FACTOR`` times the heartbeat's limit (an agent restarted by a package upgrade is
        back within seconds). A guest that never had an agent answering is never declared hung.
        """
        age, limit, what = rt.heartbeat_age_s, self.times.heartbeat_timeout_s, "no heartbeat"
        if age is None and rt.guest.agent_age_s is not None and not rt.guest.agent:
            age, limit, what = rt.guest.agent_age_s, AGENT_SILENCE_FACTOR * limit, "no guest agent answer"
        if age is None or age < limit:
            return
        if self.clock() - self._reset_at.get(rec.name, -1e9) < 2 * limit:
            return  # give the guest time to boot after the last reset
        self._reset_at[rec.name] = self.clock()
        try:
            await self.vms.agents.get(rec.host).action(rec.name, "reset")
        except KasouError as e:
            log.warning("VM monitoring could not reset %s: %s", rec.name, e.message)
            await audit.record(self.vms.store, "ha_reset", actor=audit.SYSTEM_HA, target=f"vms/{rec.name}",
                               ok=False, message=e.message, details={"host": rec.host})  # fmt: skip
            return
        await audit.record(self.vms.store, "ha_reset", actor=audit.SYSTEM_HA, target=f"vms/{rec.name}",
                           details={"host": rec.host, "heartbeat_age_s": round(age), "watched": what})  # fmt: skip
        await self.vms.ledger.record(rec.name, LedgerEvent.CRASHED, rec.host,
                                     f"guest hung: {what} for {age:.0f} s")  # fmt: skip
        await self.vms.ledger.record(rec.name, LedgerEvent.RESTARTED, rec.host, "reset by VM monitoring")
