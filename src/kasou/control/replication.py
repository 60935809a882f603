"""Replicated disks in the control plane: a second, synchronous copy of a VM's local disks on another host.

A VM created with ``storage: replicated`` keeps its disks on its own host like
a local VM and, while it runs, a replica of each on one other host (the
agents' replica side and ``attach_replica``: QEMU ``blockdev-mirror`` with
``copy-mode: write-blocking`` into an NBD export, so a write is acknowledged
only when both copies have it).

* After a start, and on every reconcile tick while the VM runs without one, a
  replica host is chosen (up, not the VM's host, not in maintenance, holding the
  fewest replicas) and the replica attached; the VM's ``replica.state`` follows
  the primary's report: ``syncing`` then ``in_sync``.
* When the replica's host or daemon is lost the VM goes on running on its local
  disk, ``degraded``; the tick detaches the dead replica and rebuilds one on
  another host when one is available (a full copy).
* When the VM's own host fails, HA promotes the replica (its daemon stops; the
  files become the VM's disks) and restarts the VM on the replica's host, after
  the same fence wait as any HA restart; a new replica follows.
* Before a live migration the replica is dropped (QEMU cannot carry the mirror
  across), and rebuilt from the destination afterwards.
"""

from __future__ import annotations

import contextlib
import logging
import time
from typing import TYPE_CHECKING, Any

from kasou.control.hosts import maintenance_hosts
from kasou.control.records import ReplicaRecord, VMRecord
from kasou.errors import KasouError, NotFound, StoreConflict
from kasou.model.state import VMState

if TYPE_CHECKING:
    from kasou.control.base import VMControl

log = logging.getLogger(__name__)

RETRY_EVERY_S = 10.0  # between two attempts to build a replica for one VM


class Replication:
    def __init__(self, vms: VMControl, clock: Any = time.monotonic) -> None:
        self.vms = vms
        self.clock = clock
        self.retry_every_s = RETRY_EVERY_S
        self._tried_at: dict[str, float] = {}
        self._built: dict[str, tuple[str | None, str]] = {}  # this tick's new replicas: VM -> (its host, replica's)

    async def _choose_host(self, rec: VMRecord, records: list[VMRecord], avoid: set[str]) -> str | None:
        """The host for ``rec``'s replica: the one holding the fewest replicas of VMs of ``rec``'s own host (the
        host a replicated VM restarts on is its replica's, so this spreads one host's failure over all the
        others), then the fewest replicas in all. The replicas built since ``records`` were read count too (one
        tick builds many after a bulk start)."""
        maintenance = await maintenance_hosts(self.vms.store)
        where = {r.name: (r.host, r.replica.host) for r in records if r.replica is not None}
        where.update(self._built)
        held: dict[str, int] = {}
        same: dict[str, int] = {}
        for primary, replica in where.values():
            held[replica] = held.get(replica, 0) + 1
            if primary == rec.host:
                same[replica] = same.get(replica, 0) + 1
        candidates = [h for h in self.vms.agents.names() if h != rec.host and h not in avoid and h not in maintenance]
        if not candidates:
            return None
        return min(candidates, key=lambda h: (same.get(h, 0), held.get(h, 0), h))

    async def build(self, rec: VMRecord, records: list[VMRecord], avoid: set[str] | None = None) -> str | None:
        """Give a running replicated VM a replica on another host; the host, or None if none can."""
        host = await self._choose_host(rec, records, avoid or set())
        if host is None:
            return None
        replica_agent: Any = self.vms.agents.get(host)
        primary: Any = self.vms.agents.get(rec.host)
        paths: dict[str, str] = {}
        try:
            for d in rec.disks:
                target = await replica_agent.create_replica(rec.name, d.id, d.size_bytes)
                paths[d.id] = target.path
                await primary.attach_replica(rec.name, target, timeout_s=0)
        except BaseException:
            for d in rec.disks:
                with contextlib.suppress(KasouError):
                    await primary.detach_replica(rec.name, d.id)
            with contextlib.suppress(KasouError):
                await replica_agent.delete_replica(rec.name)
            raise
        replica = ReplicaRecord(host=host, state="syncing", paths=paths)
        await self.vms.records.update(rec.name, lambda r: r.model_copy(update={"replica": replica}))
        self._built[rec.name] = (rec.host, host)
        log.info("VM %s: replicating its disks to %s", rec.name, host)
        return host

    async def drop(self, rec: VMRecord) -> None:
        """Detach and delete the VM's replica (migration, deletion); tolerant of hosts that are gone."""
        if rec.replica is None:
            return
        if rec.host and self.vms.agents.is_up(rec.host) and rec.state in (VMState.RUNNING, VMState.PAUSED,
                                                                          VMState.MIGRATING):  # fmt: skip
            primary: Any = self.vms.agents.get(rec.host)
            for d in rec.disks:
                with contextlib.suppress(KasouError):
                    await primary.detach_replica(rec.name, d.id)
        if self.vms.agents.is_up(rec.replica.host):
            with contextlib.suppress(KasouError):
                await self.vms.agents.get(rec.replica.host).delete_replica(rec.name)
        with contextlib.suppress(NotFound):
            await self.vms.records.update(rec.name, lambda r: r.model_copy(update={"replica": None}))

    async def promote(self, rec: VMRecord) -> dict[str, str]:
        """On the replica's host: stop serving the replica; its files (by disk id) become the VM's disks."""
        assert rec.replica is not None
        agent: Any = self.vms.agents.get(rec.replica.host)
        promotion = await agent.promote_replica(rec.name)
        return dict(promotion.disks)

    async def tick(self, records: list[VMRecord]) -> None:
        """Follow every running replicated VM's replica: state, rebuild when lost, build when missing."""
        agents = self.vms.agents
        self._built = {}  # read again in records
        for rec in records:
            if not rec.replicated or rec.state != VMState.RUNNING or rec.job is not None:
                continue
            if not agents.is_up(rec.host):
                continue  # HA's business
            try:
                await self._follow(rec, records)
            except (KasouError, StoreConflict) as e:
                log.warning("VM %s: replication: %s", rec.name, getattr(e, "message", e))

    async def _follow(self, rec: VMRecord, records: list[VMRecord]) -> None:
        agents = self.vms.agents
        primary: Any = agents.get(rec.host)
        statuses = await primary.replica_status(rec.name)
        states = {s.state for s in statuses}
        lost = rec.replica is not None and (not agents.is_up(rec.replica.host) or "degraded" in states)
        if rec.replica is not None and not lost and states and "none" not in states:
            state = "syncing" if "syncing" in states else "in_sync"
            if state != rec.replica.state:
                replica = rec.replica.model_copy(update={"state": state, "since": time.time()})
                await self.vms.records.update(rec.name, lambda r: r.model_copy(update={"replica": replica}))
                log.info("VM %s: replica on %s %s", rec.name, rec.replica.host, state)
            return
        if lost and rec.replica is not None and rec.replica.state != "degraded":
            replica = rec.replica.model_copy(update={"state": "degraded", "since": time.time()})
            await self.vms.records.update(rec.name, lambda r: r.model_copy(update={"replica": replica}))
            log.warning("VM %s: its replica on %s is lost; running degraded", rec.name, rec.replica.host)
        if self.clock() - self._tried_at.get(rec.name, -1e9) < self.retry_every_s:
            return
        self._tried_at[rec.name] = self.clock()
        avoid: set[str] = set()
        if rec.replica is not None:
            if lost:
                avoid.add(rec.replica.host)
            for d in rec.disks:
                with contextlib.suppress(KasouError):
                    await primary.detach_replica(rec.name, d.id)
            if agents.is_up(rec.replica.host):
                with contextlib.suppress(KasouError):
                    await agents.get(rec.replica.host).delete_replica(rec.name)
        current = await self.vms.records.get(rec.name)
        if await self.build(current, records, avoid) is None and current.replica is None:
            log.warning("VM %s: no other host can keep its replica now", rec.name)
