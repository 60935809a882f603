"""The load balancer: ``kasou cluster balance`` and its automatic mode, as VMware DRS's.

It reads the hosts (up, in maintenance, down) and their running VMs, measures each VM's CPU use (two samples of
the agents' counters, :mod:`kasou.hypervisor.stats`), says which VMs may not move and why, and asks
:func:`kasou.control.balancing.plan` for the moves. Without ``dry_run`` the moves run as one job, each an ordinary
live migration (:meth:`kasou.control.migration.Migrations.migrate`: its own checks, claim and undo path), at most
``max_parallel`` at once and one at a time into any one host (each checks the room its target has left).

Settings (``settings/balance`` in the store; ``GET/PUT /v1/cluster/balance/settings``): the mode ``off``,
``recommend`` (every ``interval_s`` the leader plans and raises an info event naming the moves it proposes, once
per different proposal) or ``automatic`` (it also runs them), the ``threshold`` in points of pressure spread, the
``hysteresis``, ``max_moves`` per round, ``max_parallel``, the ``cooldown_s`` during which a VM the balancer moved
is not moved again (the move's time is kept in ``balance/moved/<vm>``), and whether VMs with local disks may move
(``local_disks``: each such move copies the disks).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from kasou.control import balancing
from kasou.control.hosts import maintenance_hosts
from kasou.control.jobs import JobContext
from kasou.control.migration import MIGRATION_TIMEOUT_S, Migrations
from kasou.control.records import JobRecord, VMRecord
from kasou.errors import Conflict, HypervisorError, KasouError
from kasou.hypervisor.stats import StatsReport
from kasou.model.state import ACTIVE_STATES, VMState

log = logging.getLogger(__name__)

SETTINGS_KEY = "settings/balance"
MOVED_PREFIX = "balance/moved/"
SAMPLE_S = 1.0  # between two CPU samples when no recent one is kept
SAMPLE_MAX_AGE_S = 900.0  # an older kept sample is not used: the rate would average too long a time
STATS_TIMEOUT_S = 5.0  # one host's counters; a host that does not answer in time takes no part


class BalanceSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    mode: Literal["off", "recommend", "automatic"] = "off"
    threshold: float = Field(default=20.0, ge=1, le=100)  # points of pressure spread (highest host minus lowest)
    hysteresis: float = Field(default=5.0, ge=0, le=50)  # points by which a move must close its two hosts' gap
    max_moves: int = Field(default=8, ge=1, le=100)  # per round
    max_parallel: int = Field(default=2, ge=1, le=16)  # live migrations at once
    cooldown_s: int = Field(default=1800, ge=0, le=7 * 86400)  # a VM the balancer moved stays this long
    interval_s: int = Field(default=300, ge=10, le=86400)  # between two rounds in recommend and automatic mode
    local_disks: bool = False  # move VMs whose disks are local (each move copies them)


class BalanceRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    dry_run: bool = False


class BalanceResult(BaseModel):
    plan: balancing.Plan
    job: JobRecord | None = None  # None: a dry run, or nothing to move


class Balancer:
    def __init__(self, migrations: Migrations, clock: Callable[[], float] = time.time) -> None:
        self.migrations = migrations
        self.vms = migrations.vms
        self.store = migrations.store
        self.clock = clock
        self._samples: dict[str, StatsReport] = {}
        self._last_round = -1e18
        self._job: str | None = None  # the balance job running now, if any
        self._proposed = ""  # the moves last proposed in recommend mode

    # -- settings ----------------------------------------------------------------------------

    async def settings(self) -> BalanceSettings:
        e = await self.store.get(SETTINGS_KEY)
        return BalanceSettings.model_validate(e.value) if e is not None else BalanceSettings()

    async def set_settings(self, s: BalanceSettings) -> BalanceSettings:
        await self.store.put(SETTINGS_KEY, s.model_dump(mode="json"))
        self._last_round = -1e18  # a new mode or threshold takes effect at the next tick
        return s

    # -- what the plan is made of ------------------------------------------------------------

    async def _reports(self, hosts: list[str]) -> dict[str, StatsReport]:
        async def one(h: str) -> tuple[str, StatsReport | None]:
            try:
                return h, await self.vms.agents.get(h).stats(timeout=STATS_TIMEOUT_S)
            except (KasouError, TimeoutError):
                return h, None

        return {h: r for h, r in await asyncio.gather(*(one(h) for h in hosts)) if r is not None}

    async def cpu_use(self, hosts: list[str]) -> tuple[dict[str, float], set[str]]:
        """Each running VM's CPU use in host CPUs, from two samples of its QEMU's CPU time; and the hosts that
        answered. A sample kept from the last round (younger than ``SAMPLE_MAX_AGE_S``) is the first one."""
        now = await self._reports(hosts)
        old = {h: r for h, r in self._samples.items() if h in now and now[h].host.taken_at - r.host.taken_at > 0}
        if any(h not in old or now[h].host.taken_at - old[h].host.taken_at > SAMPLE_MAX_AGE_S for h in now):
            old = now
            await asyncio.sleep(SAMPLE_S)
            now = {h: r for h, r in (await self._reports(list(old))).items()}
        self._samples.update(now)
        use: dict[str, float] = {}
        for h, rep in now.items():
            before = {v.name: v for v in old.get(h, rep).vms}
            for v in rep.vms:
                b = before.get(v.name)
                dt = v.taken_at - b.taken_at if b is not None else 0.0
                if b is not None and dt > 0 and v.cpu_seconds >= b.cpu_seconds:
                    use[v.name] = (v.cpu_seconds - b.cpu_seconds) / dt
        return use, set(now)

    async def _moved_at(self) -> dict[str, tuple[float, str]]:
        """When the balancer last moved each VM, and the uuid of that VM (a new VM of the same name is another)."""
        out = {}
        for e in await self.store.range(MOVED_PREFIX):
            out[e.key[len(MOVED_PREFIX) :]] = (float(e.value.get("at", 0)), str(e.value.get("uuid", "")))
        return out

    def blocker(self, rec: VMRecord, s: BalanceSettings, moved_at: float | None) -> str | None:
        """Why the balancer may not move ``rec`` now, or None."""
        if rec.state != VMState.RUNNING:
            return f"it is {rec.state.value}, not running"
        if rec.job is not None:
            return f"it is busy with job {rec.job}"
        if rec.snapshots:
            return "it has snapshots, whose layers live on its host (a migration refuses it)"
        if rec.cdrom:
            return "an ISO image is in its CD drive (it would have to be on the target host too)"
        local = [d.id for d in rec.disks if not d.shared]
        if local and not s.local_disks:
            return (
                f"its disk{'s' if len(local) > 1 else ''} {', '.join(local)} {'are' if len(local) > 1 else 'is'} "
                f"local to {rec.host}: a move would copy {'them' if len(local) > 1 else 'it'} "
                "(allow with the setting local_disks)"
            )
        if moved_at is not None and s.cooldown_s and self.clock() - moved_at < s.cooldown_s:
            ago = self.clock() - moved_at
            return f"the balancer moved it {ago:.0f} s ago (cool-down {s.cooldown_s} s)"
        return None

    async def plan(self, s: BalanceSettings | None = None) -> balancing.Plan:
        """The moves that would even out the hosts now (nothing is changed)."""
        s = s or await self.settings()
        agents = self.vms.agents
        await agents.refresh(force=True)
        maintenance = await maintenance_hosts(self.store)
        loads = {h.name: h for h in await self.vms.host_loads()}
        cpu, answered = await self.cpu_use(sorted(loads))
        hosts = []
        for name in agents.known():
            load = loads.get(name)
            why = None
            if load is None or not agents.is_up(name):
                why = "down (or its agent does not answer)"
            elif name in maintenance:
                why = "in maintenance"
            elif name not in answered:
                why = "its agent did not report its VMs' CPU use in time"
            hosts.append(balancing.BalanceHost(name, load.cpus if load else 0, load.memory_total_mib if load else 0,
                                               why))  # fmt: skip
        moved = await self._moved_at()
        vms = [
            balancing.BalanceVM(r.name, r.host, r.memory_mib, r.vcpus, cpu.get(r.name, 0.0), r.anti_affinity,
                                r.ha, self.blocker(r, s, _at(moved.get(r.name), r.uuid)))
            for r in await self.vms.records.all()
            if r.host is not None and r.state in ACTIVE_STATES
        ]  # fmt: skip
        policy = balancing.Policy(s.threshold, s.hysteresis, s.max_moves, self.vms.vcpu_ratio)
        return balancing.plan(hosts, vms, policy)

    # -- running it --------------------------------------------------------------------------

    async def balance(self, dry_run: bool = False) -> BalanceResult:
        """Plan, and unless ``dry_run`` run the moves as one job."""
        if self._job is not None and not dry_run:
            raise Conflict(f"balance job {self._job} is still running; wait for it (kasou job show {self._job})")
        s = await self.settings()
        p = await self.plan(s)
        if dry_run or not p.moves:
            return BalanceResult(plan=p)
        return BalanceResult(plan=p, job=await self._submit(p, s))

    async def _submit(self, p: balancing.Plan, s: BalanceSettings) -> JobRecord:
        async def run(ctx: JobContext) -> dict[str, Any]:
            try:
                return await self._run(ctx, p, s)
            finally:
                self._job = None

        job = await self.vms.jobs.submit("balance", None, run)
        self._job = job.id
        return job

    async def _run(self, ctx: JobContext, p: balancing.Plan, s: BalanceSettings) -> dict[str, Any]:
        sem = asyncio.Semaphore(s.max_parallel)
        into = {m.target: asyncio.Lock() for m in p.moves}  # one at a time into a host: each sees the room left
        results: dict[str, dict[str, Any]] = {}
        total = len(p.moves)

        async def one(m: balancing.Move) -> None:
            async with sem, into[m.target]:
                results[m.vm] = await self._move(m)
            done = len(results)
            await ctx.progress(done / total, f"{done}/{total} moves done ({m.vm}: {m.source} → {m.target})")

        await ctx.progress(0.0, f"{total} moves, at most {s.max_parallel} at once")
        await asyncio.gather(*(one(m) for m in p.moves))
        rows = [{**results[m.vm], "vm": m.vm, "from": m.source, "to": m.target, "reason": m.reason} for m in p.moves]
        failed = [r for r in rows if not r["ok"]]
        summary = {"moves": rows, "spread_before": p.spread_before, "spread_planned": p.spread_after}
        if failed:
            raise HypervisorError(
                f"{len(failed)} of {total} balancing moves failed (e.g. {failed[0]['vm']}: {failed[0]['error']})",
                **summary,
            )
        return summary

    async def _move(self, m: balancing.Move) -> dict[str, Any]:
        """One planned move as a migration job, waited for; what came of it."""
        try:
            rec = await self.vms.records.get(m.vm)
            if rec.host != m.source or rec.state != VMState.RUNNING:
                return {"ok": False, "error": f"it is {rec.state.value} on {rec.host} now, not running on {m.source}"}
            job = await self.migrations.migrate(m.vm, to=m.target)
            done = await self.vms.jobs.wait(job.id, MIGRATION_TIMEOUT_S + 60)
        except KasouError as e:
            return {"ok": False, "error": e.message}
        if done.error:
            return {"ok": False, "error": str(done.error.get("message", "failed")), "job": done.id}
        await self.store.put(MOVED_PREFIX + m.vm, {"at": self.clock(), "uuid": rec.uuid, "from": m.source,
                                                   "to": m.target})  # fmt: skip
        r = done.result or {}
        return {"ok": True, "job": done.id, "downtime_ms": r.get("downtime_ms"), "total_ms": r.get("total_ms")}

    # -- recommend and automatic mode (the leader's reconciler calls this) -------------------

    async def tick(self) -> None:
        s = await self.settings()
        if s.mode == "off" or self.clock() - self._last_round < s.interval_s or self._job is not None:
            return
        self._last_round = self.clock()
        p = await self.plan(s)
        if not p.moves:
            self._proposed = ""
            return
        if s.mode == "automatic":
            job = await self._submit(p, s)
            log.info("balancing: %d moves (job %s): %s", len(p.moves), job.id, p.summary)
            return
        proposal = "; ".join(f"{m.vm} {m.source} → {m.target}" for m in p.moves)
        if proposal == self._proposed:
            return
        self._proposed = proposal
        worst = max(p.spread_before, key=lambda r: p.spread_before[r])
        msg = (
            f"balancing recommends {len(p.moves)} live migration{'s' if len(p.moves) > 1 else ''}: {proposal} "
            f"({worst} spread {p.spread_before[worst]:g} → {p.spread_after[worst]:g} points); "
            "run them with kasou cluster balance"
        )
        with contextlib.suppress(KasouError):
            await self.vms.events.emit("balance_recommended", "cluster", msg, "info")


def _at(moved: tuple[float, str] | None, uuid: str) -> float | None:
    """When the balancer moved the VM of ``uuid``, or None."""
    return moved[0] if moved is not None and moved[1] == uuid else None
