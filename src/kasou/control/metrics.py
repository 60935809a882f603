"""A short history of resource figures (hosts and VMs), in memory, for the web UI's small charts.

Every ``interval_s`` (5 s) the collector asks each host's agent for its
:class:`~kasou.hypervisor.stats.StatsReport` and turns two consecutive reports into
rates: CPU % (of one host CPU for a VM, of the whole host for a host), resident
memory, disk and network bytes per second. It keeps ``keep_s`` (10 minutes) of
points per host and VM; nothing is written to the store (a restart starts afresh,
Prometheus keeps the long history from ``/metrics``).

The collector runs only while someone reads (the UI, a Prometheus scrape): it starts at
the first read and stops by itself after ``idle_stop_s`` without one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable

from pydantic import BaseModel

from kasou.control.hosts import Agents
from kasou.errors import KasouError
from kasou.hypervisor.stats import HostStats, StatsReport, VmStats

log = logging.getLogger(__name__)

INTERVAL_S = 5.0
KEEP_S = 600.0
IDLE_STOP_S = 900.0
FETCH_TIMEOUT_S = 4.0


class VmPoint(BaseModel):
    t: float
    cpu_pct: float  # of one host CPU (a VM busy on 2 vCPUs shows 200)
    rss_bytes: int
    disk_read_bps: float
    disk_write_bps: float
    net_rx_bps: float  # as the host's tap sees it: what the guest sent
    net_tx_bps: float


class HostPoint(BaseModel):
    t: float
    cpu_pct: float  # of the whole host (all CPUs)
    load_1m: float
    memory_used_bytes: int
    memory_total_bytes: int


class MetricsHistory(BaseModel):
    interval_s: float
    hosts: dict[str, list[HostPoint]]
    vms: dict[str, list[VmPoint]]
    vm_host: dict[str, str]  # where each VM was measured last
    notes: dict[str, str]  # per VM: what could not be measured


def _rate(new: float, old: float, dt: float) -> float:
    return max(0.0, (new - old) / dt) if dt > 0 else 0.0


def vm_point(new: VmStats, old: VmStats | None) -> VmPoint | None:
    """The rates between two samples of one VM (None for the first sample or after a restart of its QEMU)."""
    if old is None or new.cpu_seconds < old.cpu_seconds:
        return None
    dt = new.taken_at - old.taken_at
    if dt <= 0:
        return None
    return VmPoint(
        t=round(new.taken_at, 3),
        cpu_pct=round(_rate(new.cpu_seconds, old.cpu_seconds, dt) * 100, 2),
        rss_bytes=new.rss_bytes,
        disk_read_bps=round(_rate(new.disk_read_bytes, old.disk_read_bytes, dt), 1),
        disk_write_bps=round(_rate(new.disk_write_bytes, old.disk_write_bytes, dt), 1),
        net_rx_bps=round(_rate(new.net_rx_bytes, old.net_rx_bytes, dt), 1),
        net_tx_bps=round(_rate(new.net_tx_bytes, old.net_tx_bytes, dt), 1),
    )


def host_point(new: HostStats, old: HostStats | None) -> HostPoint:
    busy = total = 0.0
    if old is not None:
        busy = new.cpu_busy_seconds - old.cpu_busy_seconds
        total = new.cpu_total_seconds - old.cpu_total_seconds
    return HostPoint(
        t=round(new.taken_at, 3),
        cpu_pct=round(100 * busy / total, 2) if total > 0 and busy >= 0 else 0.0,
        load_1m=new.load_1m,
        memory_used_bytes=max(0, new.memory_total_bytes - new.memory_available_bytes),
        memory_total_bytes=new.memory_total_bytes,
    )


class Metrics:
    """Collects reports from every host that is up; keeps the last ``keep_s`` of points."""

    def __init__(
        self,
        agents: Agents,
        interval_s: float = INTERVAL_S,
        keep_s: float = KEEP_S,
        idle_stop_s: float = IDLE_STOP_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.agents = agents
        self.interval_s = interval_s
        self.keep_s = keep_s
        self.idle_stop_s = idle_stop_s
        self._clock = clock
        n = max(2, int(keep_s / interval_s) + 1)
        self._maxlen = n
        self.reports: dict[str, StatsReport] = {}  # the latest report of each host
        self._last_vm: dict[str, VmStats] = {}
        self._vm_host: dict[str, str] = {}
        self._hosts: dict[str, deque[HostPoint]] = {}
        self._vms: dict[str, deque[VmPoint]] = {}
        self._task: asyncio.Task[None] | None = None
        self._last_read = clock()
        self._collected_at = 0.0

    def touch(self) -> None:
        """Someone reads: make sure the collector runs."""
        self._last_read = self._clock()
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run(), name="metrics-collector")

    async def _run(self) -> None:
        while self._clock() - self._last_read < self.idle_stop_s:
            try:
                await self.collect()
            except Exception:  # never let one bad answer end the collector
                log.exception("collecting metrics failed")
            await asyncio.sleep(self.interval_s)

    async def _fetch(self, host: str) -> tuple[str, StatsReport | None]:
        try:
            return host, await asyncio.wait_for(self.agents.get(host).stats(timeout=FETCH_TIMEOUT_S), FETCH_TIMEOUT_S)
        except (KasouError, TimeoutError) as e:
            log.info("no figures from host %s: %s", host, e)
            return host, None

    async def _gather(self) -> list[tuple[str, StatsReport | None]]:
        await self.agents.refresh()
        return list(await asyncio.gather(*(self._fetch(h) for h in self.agents.names())))

    async def collect(self) -> dict[str, StatsReport]:
        """Ask every host that is up for its figures now, and add one point per host and VM."""
        got = await self._gather()
        seen: set[str] = set()
        for host, rep in got:
            if rep is None:
                continue
            old = self.reports.get(host)
            self.reports[host] = rep
            self._hosts.setdefault(host, deque(maxlen=self._maxlen)).append(
                host_point(rep.host, old.host if old else None)
            )
            for vs in rep.vms:
                seen.add(vs.name)
                prev = self._last_vm.get(vs.name)
                if self._vm_host.get(vs.name) != host:
                    prev = None  # migrated: counters of another QEMU process
                p = vm_point(vs, prev)
                self._last_vm[vs.name] = vs
                self._vm_host[vs.name] = host
                if p is not None:
                    self._vms.setdefault(vs.name, deque(maxlen=self._maxlen)).append(p)
        for host in [h for h in self.reports if h not in dict(got)]:
            self.reports.pop(host, None)  # a host that is down has no current figures
        for name in [n for n in self._last_vm if n not in seen]:
            self._last_vm.pop(name, None)  # not running any more: its next start begins afresh
        horizon = time.time() - self.keep_s
        for vser in self._vms.values():
            while vser and vser[0].t < horizon:
                vser.popleft()
        for hser in self._hosts.values():
            while hser and hser[0].t < horizon:
                hser.popleft()
        for name in [n for n, s in self._vms.items() if not s]:
            self._vms.pop(name, None)
        self._collected_at = self._clock()
        return self.reports

    async def current(self, max_age_s: float = 2.0) -> dict[str, StatsReport]:
        """The latest report of each host, fetched now if the last one is older than ``max_age_s``."""
        self.touch()
        if self._clock() - self._collected_at <= max_age_s and self.reports:
            return dict(self.reports)
        return {h: r for h, r in await self._gather() if r is not None}  # the history keeps its own pace

    def history(self, since: float | None = None) -> MetricsHistory:
        self.touch()
        since = since or 0.0
        return MetricsHistory(
            interval_s=self.interval_s,
            hosts={h: [p for p in s if p.t > since] for h, s in sorted(self._hosts.items())},
            vms={v: [p for p in s if p.t > since] for v, s in sorted(self._vms.items())},
            vm_host=dict(sorted(self._vm_host.items())),
            notes={v.name: v.note for v in self._last_vm.values() if v.note},
        )

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
            self._task = None
