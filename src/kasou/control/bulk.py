"""Bulk actions: start, shut down or stop many VMs as one job, with a result per VM.

``kasou vm start --tag ward-a``, ``kasou vm start --all``, ``kasou vm shutdown --host h2`` (``POST
/v1/vms/actions/{action}``): the API picks the VMs (:class:`kasou.model.selection.BulkSelector`, and
for a vendor only the VMs of their maintenance window), then :meth:`Bulk.run` submits one job that

- runs each VM's own action job (:meth:`VMControl.action`: the same checks, claim, admission, ledger
  and last error as ``kasou vm start NAME``) and waits for it, bounded;
- skips a VM already in the state asked for (``already running``, ``already stopped``);
- starts **in start-up order** (``--onboot --order N --delay S``, as :mod:`kasou.control.onboot`):
  the VMs of one order form a group, groups go lowest order first, a group begins once every VM of
  the group before it is running or has failed, and after the largest ``delay_s`` of that group's
  started VMs; VMs with no start-up setting form the last group. Within a group, VMs start **in
  parallel**, at most ``per_host`` at once on one host (default: its CPUs, between 2 and 8),
  highest HA priority first; the admission of starts on one host (memory never overcommitted, the HA
  reserve) is taken one VM at a time, so parallel starts never over-admit a host;
- shuts down and stops in the reverse order (the application before its database), no delays.

The job succeeds when every VM was tried: its result lists each VM's ``outcome`` (``succeeded``,
``failed`` with its one-line ``reason``, ``skipped`` with why) and the counts. ``guard`` (a vendor's
window) is asked again just before each VM is touched: a window that ended meanwhile stops the rest.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

from kasou.control.base import VMControl, VMView
from kasou.control.jobs import JobContext
from kasou.control.records import JobRecord, JobState
from kasou.errors import AgentUnavailable, KasouError, OperationTimeout
from kasou.model.selection import BulkAction
from kasou.model.spec import STARTUP_ORDER_MAX
from kasou.model.state import ACTIVE_STATES, Action, VMState

Guard = Callable[[VMView], Awaitable[str | None]]  # None: go on; else why this VM may not be touched now

NO_ORDER = STARTUP_ORDER_MAX + 1  # VMs without a start-up setting: the last group
START_WAIT_S = 300.0  # one VM's start job, as kasou.control.onboot
STOP_WAIT_S = 120.0
ADMISSION_WAIT_S = 60.0  # until a start job is past its admission (its VM is starting, or the job ended)
PER_HOST_MIN, PER_HOST_MAX = 2, 8

_ALREADY: dict[BulkAction, dict[VMState, str]] = {
    BulkAction.START: {
        VMState.RUNNING: "already running",
        VMState.STARTING: "already starting",
        VMState.PAUSED: "already running (paused)",
        VMState.MIGRATING: "already running (migrating)",
    },
    BulkAction.SHUTDOWN: {VMState.STOPPED: "already stopped", VMState.CRASHED: "already stopped (crashed)"},
    BulkAction.STOP: {VMState.STOPPED: "already stopped", VMState.CRASHED: "already stopped (crashed)"},
}


def per_host_default(action: BulkAction, cpus: int) -> int:
    """Starts at once on a host: its CPUs (each QEMU's launch and early boot take a CPU), between 2 and 8;
    shutdowns and stops mostly wait on their guests: twice that."""
    n = max(PER_HOST_MIN, min(PER_HOST_MAX, cpus))
    return n if action == BulkAction.START else 2 * n


def groups(views: list[VMView], action: BulkAction) -> list[list[VMView]]:
    """The VMs in start-up order groups (lowest order first; reversed for a shutdown or stop), each by HA
    priority (highest first), then name."""
    by: dict[int, list[VMView]] = {}
    for v in views:
        by.setdefault(v.startup.order if v.startup is not None else NO_ORDER, []).append(v)
    out = [sorted(by[k], key=lambda v: (-v.priority, v.name)) for k in sorted(by)]
    return out if action == BulkAction.START else out[::-1]


class Bulk:
    def __init__(self, vms: VMControl) -> None:
        self.vms = vms

    async def run(
        self,
        action: BulkAction,
        views: list[VMView],
        per_host: int | None = None,
        timeout: float | None = None,
        guard: Guard | None = None,
        owner: tuple[str | None, str | None] | None = None,
    ) -> JobRecord:
        """Submit the bulk job over ``views`` (already selected and allowed). ``owner``: the VM uuid and
        department the job belongs to (who may follow it); default: the VMs' one department, if one."""
        if owner is None:
            departments = {v.department for v in views}
            owner = (None, departments.pop() if len(departments) == 1 else None)
        plan = groups(views, action)

        async def job(ctx: JobContext) -> dict[str, Any]:
            return await self._run(ctx, action, plan, per_host, timeout, guard)

        return await self.vms.jobs.submit(f"bulk-{action.value}", None, job, vm_uuid=owner[0], department=owner[1])

    async def _limits(self, action: BulkAction, hosts: set[str | None], per_host: int | None) -> dict[str | None, int]:
        out: dict[str | None, int] = {}
        for h in hosts:
            if per_host is not None:
                out[h] = per_host
                continue
            try:
                cpus = (await self.vms.agents.get(h).host_info()).cpus
            except (AgentUnavailable, OperationTimeout, KasouError):
                cpus = PER_HOST_MIN  # its VMs' own jobs say what is wrong with it
            out[h] = per_host_default(action, cpus)
        return out

    async def _run(
        self,
        ctx: JobContext,
        action: BulkAction,
        plan: list[list[VMView]],
        per_host: int | None,
        timeout: float | None,
        guard: Guard | None,
    ) -> dict[str, Any]:
        began = time.monotonic()
        total = sum(len(g) for g in plan)
        hosts = {v.host for g in plan for v in g}
        limits = await self._limits(action, hosts, per_host)
        slots = {h: asyncio.Semaphore(n) for h, n in limits.items()}
        admission = {h: asyncio.Lock() for h in hosts}
        results: list[dict[str, Any]] = []
        stopped: list[str] = []  # why the rest was not tried (a vendor's window ended)

        async def one(v: VMView) -> dict[str, Any]:
            async with slots[v.host]:
                res = await self._one(action, v, admission[v.host], timeout, guard, stopped)
            results.append(res)
            await ctx.progress(len(results) / max(total, 1), f"{len(results)} of {total} VMs done")
            return res

        await ctx.progress(0.0, f"{action.value}: {total} VMs in {len(plan)} group(s)")
        for i, group in enumerate(plan):
            done = await asyncio.gather(*(one(v) for v in group))
            delay = max((v.startup.delay_s for v, r in zip(group, done, strict=True)
                         if v.startup is not None and r["outcome"] == "succeeded"), default=0)  # fmt: skip
            if action == BulkAction.START and delay and i < len(plan) - 1:
                await ctx.progress(len(results) / max(total, 1), f"waiting {delay} s before the next group")
                await asyncio.sleep(delay)
        order = {v.name: n for n, v in enumerate(v for g in plan for v in g)}
        results.sort(key=lambda r: order[r["vm"]])
        count = {k: sum(1 for r in results if r["outcome"] == k) for k in ("succeeded", "failed", "skipped")}
        return {
            "action": action.value,
            "selected": total,
            **count,
            "groups": [[v.name for v in g] for g in plan],
            "per_host": {str(h): n for h, n in limits.items()},
            "elapsed_s": round(time.monotonic() - began, 2),
            "vms": results,
        }

    async def _one(
        self,
        action: BulkAction,
        v: VMView,
        admission: asyncio.Lock,
        timeout: float | None,
        guard: Guard | None,
        stopped: list[str],
    ) -> dict[str, Any]:
        res: dict[str, Any] = {"vm": v.name, "host": v.host, "outcome": "failed", "reason": None, "job": None}
        try:
            rec = await self.vms.records.get(v.name)  # as it is now, not when it was selected
        except KasouError as e:
            return {**res, "reason": e.message}
        if rec.uuid != v.uuid:
            return {**res, "reason": "it was deleted (another VM holds its name now)"}
        state = rec.state if rec.state not in ACTIVE_STATES or v.host_reachable else VMState.UNKNOWN
        already = _ALREADY[action].get(state)
        if already is not None and rec.job is None:
            return {**res, "outcome": "skipped", "reason": already, "state": state.value}
        if state == VMState.UNKNOWN:
            return {**res, "reason": f"its host {v.host} does not answer", "state": state.value}
        if stopped:
            return {**res, "outcome": "skipped", "reason": stopped[0]}
        if guard is not None:
            why = await guard(v)
            if why is not None:
                stopped.append(why)
                return {**res, "outcome": "skipped", "reason": why}
        try:
            if action == BulkAction.START:
                async with admission:  # one start at a time past its host's admission (memory, HA reserve)
                    job = await self.vms.action(v.name, Action.START)
                    await self._admitted(v.name, job.id)
                wait = START_WAIT_S
            else:
                job = await self.vms.action(v.name, Action(action.value), timeout)
                wait = (timeout or 60.0) + STOP_WAIT_S if action == BulkAction.SHUTDOWN else STOP_WAIT_S
            res["job"] = job.id
            done = await self.vms.jobs.wait(job.id, wait)
        except KasouError as e:
            return {**res, "reason": e.message}
        if done.state != JobState.SUCCEEDED:
            err: Any = done.error or {}
            return {**res, "reason": str(err.get("message") if isinstance(err, dict) else err) or "its job failed"}
        out = {**res, "outcome": "succeeded", "state": (done.result or {}).get("state")}
        if (done.result or {}).get("detail"):
            out["detail"] = done.result["detail"]  # type: ignore[index]  # a shutdown: what ended the guest
        return out

    async def _admitted(self, name: str, job_id: str) -> None:
        """Wait (bounded) until start job ``job_id`` is past its admission: the VM is starting, or the job ended."""
        deadline = time.monotonic() + ADMISSION_WAIT_S
        while time.monotonic() < deadline:
            if (await self.vms.records.get(name)).state in ACTIVE_STATES or (await self.vms.jobs.get(job_id)).done:
                return
            await asyncio.sleep(0.05)
