"""Starting VMs when their host boots (``kasou vm create|set --onboot --order N --delay S``).

A host's agent says, in its host info, which run of it this is (``agent_run``, new at each start) and
whether it found no VM running when it started (``started_empty``): the host booted, or kasou was
started again after ``kasou down --vms``. The first time the control plane sees a new run of an agent
that started empty, it starts the VMs recorded on that host whose start-up settings say ``onboot`` and
that are stopped or crashed there, as one bulk start (:mod:`kasou.control.bulk`, as ``kasou vm start
--all``): lowest ``order`` first, the VMs of one order in parallel within the host's limit (its CPUs,
2 to 8 at once), the next order after the largest ``delay_s`` of the order before (a database before
the application that needs it), as Proxmox's ``onboot``/``startup`` do, but a power cut's dozens of
VMs do not come back one at a time. Each start is an ordinary start job: admission (taken one VM at a
time), HA checks and the VM's single placement hold, so a VM already started elsewhere (HA restarted
it) is not started again. A start that fails is an event naming the VM and why; the sequence goes on with the next.

The run of each host that was handled is kept in the store (``onboot/<host>``), so a restart of the
control plane does not start again the VMs an operator stopped since the host booted.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

from kasou.agent.hostinfo import HostInfo
from kasou.control.base import VMControl
from kasou.control.bulk import Bulk
from kasou.control.records import VMRecord
from kasou.errors import AgentUnavailable, KasouError, OperationTimeout
from kasou.hypervisor.base import RuntimeInfo, RuntimeState
from kasou.model.selection import BulkAction
from kasou.model.state import VMState

log = logging.getLogger(__name__)

KEY_PREFIX = "onboot/"
BUSY_CHECK_S = 30.0
LIVE = (RuntimeState.RUNNING, RuntimeState.PAUSED, RuntimeState.SHUTTING_DOWN, RuntimeState.INCOMING)
START_TIMEOUT_S = 300.0  # one start job, from its submission to its end
MAX_DELAYS_S = 600.0 * 10  # the delays between start-up groups, generously bounded


def due(records: list[VMRecord], host: str) -> list[VMRecord]:
    """The VMs to start at ``host``'s boot, in their start-up order."""
    marked = [
        r
        for r in records
        if r.host == host
        and r.startup is not None
        and r.startup.onboot
        and r.state in (VMState.STOPPED, VMState.CRASHED)
    ]
    return sorted(marked, key=lambda r: (r.startup.order if r.startup else 0, r.name))


class OnBoot:
    """Watches the hosts' agents for a new run that found nothing running, and starts that host's onboot VMs."""

    def __init__(self, vms: VMControl, start_timeout_s: float = START_TIMEOUT_S) -> None:
        self.vms = vms
        self.start_timeout_s = start_timeout_s
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._asked: dict[str, float] = {}  # when each host's agent was last asked for its run (monotonic)

    async def tick(self, runtimes: dict[str, dict[str, RuntimeInfo]]) -> None:
        """Called with the reconcile loop, after the records were brought up to date with the hosts' reports
        (``runtimes``: each host that answered, its VMs). A host that runs no VM now is asked at every tick
        which run of its agent this is; one that runs VMs did not just boot and is asked only every
        ``BUSY_CHECK_S`` (so that its run is known when its VMs stop later)."""
        now = time.monotonic()
        for host, vms in runtimes.items():
            busy = any(rt.state in LIVE for rt in vms.values())
            asked = self._asked.get(host)
            if busy and asked is not None and now - asked < BUSY_CHECK_S:
                continue
            self._asked[host] = now
            task = self._tasks.get(host)
            if task is not None and not task.done():
                continue
            try:
                info = await self.vms.agents.get(host).host_info()
            except (AgentUnavailable, OperationTimeout):
                continue
            await self._seen(host, info)

    async def _seen(self, host: str, info: HostInfo) -> None:
        if not info.agent_run:
            return
        entry = await self.vms.store.get(KEY_PREFIX + host)
        if entry is not None and entry.value.get("agent_run") == info.agent_run:
            return
        await self.vms.store.put(KEY_PREFIX + host, {"agent_run": info.agent_run, "started_empty": info.started_empty})
        if not info.started_empty:
            return
        order = due(await self.vms.records.all(), host)
        if order:
            log.info("host %s booted: starting %s", host, ", ".join(r.name for r in order))
            self._tasks[host] = asyncio.create_task(self._start_in_order(host, order))

    async def _start_in_order(self, host: str, order: list[VMRecord]) -> None:
        """Start the VMs still due as one bulk start (:mod:`kasou.control.bulk`): start-up order groups, lowest
        first, the VMs of one order in parallel within the host's limit, the group's delay before the next."""
        still: set[str] = set()
        for planned in order:
            try:
                rec = await self.vms.records.get(planned.name)
            except KasouError:
                continue  # deleted meanwhile
            if rec.host != host or rec.state not in (VMState.STOPPED, VMState.CRASHED) or rec.job is not None:
                continue  # started, moved or busy meanwhile: nothing to do
            if rec.startup and rec.startup.onboot:
                still.add(rec.name)
        views = [v for v in await self.vms.list_all() if v.name in still]
        if not views:
            return
        try:
            job = await Bulk(self.vms).run(BulkAction.START, views, owner=(None, None))
            done = await self.vms.jobs.wait(job.id, self.start_timeout_s * len(views) + MAX_DELAYS_S)
        except KasouError as e:
            results = [{"vm": v.name, "outcome": "failed", "reason": e.message} for v in views]
        else:
            results = list((done.result or {}).get("vms") or [])
            if done.state != "succeeded" and not results:
                err: Any = done.error or {}
                why = str(err.get("message") if isinstance(err, dict) else err) or "the start job failed"
                results = [{"vm": v.name, "outcome": "failed", "reason": why} for v in views]
        for r in results:
            name = r["vm"]
            if r["outcome"] == "failed":
                await self.vms.events.raise_once(
                    f"onboot/{name}", "vm_onboot_failed", f"vm/{name}",
                    f"VM {name} is marked to start when host {host} boots and did not start: {r.get('reason')}",
                    "critical",
                )  # fmt: skip
            elif r["outcome"] == "succeeded":
                await self.vms.events.clear(f"onboot/{name}")

    async def close(self) -> None:
        for task in self._tasks.values():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks.clear()
