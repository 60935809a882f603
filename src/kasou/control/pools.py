"""Storage pools in the control plane: their records, how full they are, and the room a new disk needs.

A pool's *capacity* is the one its operator gave, or the size of its file system. Disks are thin:
*provisioned* is the sum of their virtual sizes (both copies of a mirrored disk count, each in its
pool), *allocated* what their files hold now. A new disk is refused when provisioned would pass
``capacity * overcommit`` (the numbers in the message), or when the file system has no room for what
the disk holds from the start. Pools low on space raise a warning event (once, until they recover);
a full or missing pool an error event. Local pools are measured on every host, shared ones once.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, Field

from kasou.agent.pools import PoolRef, PoolUsage
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
)
from kasou.model.pools import DEFAULT_POOL, DEFAULT_POOL_OVERCOMMIT, DEFAULT_WARN_FREE_PCT, PoolCreate, overlaps
from kasou.model.units import format_size

if TYPE_CHECKING:
    from kasou.control.base import VMControl
    from kasou.control.events import Severity
    from kasou.control.records import VMRecord

POOL_PREFIX = "pools/"
FULL_BELOW_BYTES = 64 * 1024 * 1024  # a pool with less free is full: the next cluster a guest needs may not fit

PoolState = Literal["ok", "low", "full", "missing", "unreachable"]


def pool_key(name: str) -> str:
    return f"{POOL_PREFIX}{name}"


class PoolRecord(BaseModel):
    name: str
    path: str | None  # None: the built-in pool (each host's disk directory)
    shared: bool = False
    capacity_bytes: int | None = None  # None: the file system's size
    overcommit: float = 1.0
    warn_free_pct: int = DEFAULT_WARN_FREE_PCT
    description: str = ""
    created_at: float = Field(default_factory=time.time)

    def ref(self) -> PoolRef:
        return PoolRef(name=self.name, path=self.path)


BUILTIN = PoolRecord(
    name=DEFAULT_POOL, path=None, overcommit=DEFAULT_POOL_OVERCOMMIT, description="each host's disk directory",
    created_at=0.0,
)  # fmt: skip


class PoolHostView(BaseModel):
    """One pool as one host sees it (a shared pool: as any host sees it)."""

    host: str
    state: PoolState
    path: str | None = None
    capacity_bytes: int = 0
    allocated_bytes: int = 0  # what the files hold
    free_bytes: int = 0  # room left: the less of the file system's free space and capacity - allocated
    provisioned_bytes: int = 0  # the disks' virtual sizes
    limit_bytes: int = 0  # capacity * overcommit: provisioned may not pass it
    overcommit_ratio: float = 0.0  # provisioned / capacity
    error: str | None = None


class PoolView(BaseModel):
    name: str
    path: str | None
    shared: bool
    capacity_bytes: int | None  # as given (None: the file system's size)
    overcommit: float  # the most provisioned / capacity may reach
    warn_free_pct: int
    description: str
    disks: int  # disk files in it (copies of mirrored disks count once each)
    hosts: list[PoolHostView]


def measure(rec: PoolRecord, host: str, u: PoolUsage, provisioned: int) -> PoolHostView:
    """The figures of one pool on one host, from the agent's measurement and the records."""
    if not u.exists or not u.writable:
        return PoolHostView(host=host, state="missing", path=u.path, provisioned_bytes=provisioned,
                            error=u.error or f"{u.path} is not writable")  # fmt: skip
    capacity = rec.capacity_bytes if rec.capacity_bytes is not None else u.fs_total_bytes
    free = max(0, min(u.fs_free_bytes, capacity - u.allocated_bytes))
    state: PoolState = "ok"
    if free < FULL_BELOW_BYTES:
        state = "full"
    elif capacity > 0 and free * 100 < capacity * rec.warn_free_pct:
        state = "low"
    return PoolHostView(
        host=host,
        state=state,
        path=u.path,
        capacity_bytes=capacity,
        allocated_bytes=u.allocated_bytes,
        free_bytes=free,
        provisioned_bytes=provisioned,
        limit_bytes=int(capacity * rec.overcommit),
        overcommit_ratio=round(provisioned / capacity, 3) if capacity > 0 else 0.0,
    )


def disks_in(records: list[VMRecord], pool: str, host: str | None, shared: bool) -> list[tuple[str, int]]:
    """(file, virtual size) of every disk copy in ``pool`` on ``host`` (a shared pool: on any host)."""
    out = []
    for r in records:
        if not shared and r.host != host:
            continue
        for d in r.disks:
            if d.pool == pool:
                out.append((d.path or f"{r.name}/{d.id}", d.size_bytes))
            if d.mirror is not None and d.mirror.pool == pool and d.mirror.path is not None:
                out.append((d.mirror.path, d.size_bytes))
    return out


class Pools:
    def __init__(self, vms: VMControl) -> None:
        self.vms = vms
        self.store = vms.store
        self._reserved: dict[tuple[str, str], int] = {}  # (pool, host) -> bytes of disks being made
        self._lock = asyncio.Lock()

    # -- records -------------------------------------------------------------------------

    async def get_record(self, name: str) -> PoolRecord:
        if name == DEFAULT_POOL:
            return BUILTIN
        e = await self.store.get(pool_key(name))
        if e is None:
            known = ", ".join(r.name for r in await self.records())
            raise NotFound(f"unknown pool {name!r} (pools: {known}; make one with: kasou pool create)")
        return PoolRecord.model_validate(e.value)

    async def records(self) -> list[PoolRecord]:
        return [BUILTIN] + [PoolRecord.model_validate(e.value) for e in await self.store.range(POOL_PREFIX)]

    def _host_key(self, rec: PoolRecord, host: str) -> str:
        return "*" if rec.shared else host

    # -- operations ----------------------------------------------------------------------

    async def create(self, spec: PoolCreate) -> PoolView:
        spec.check()
        for other in await self.records():
            if other.name == spec.name:
                raise AlreadyExists(f"a pool named {spec.name!r} already exists")
            if other.path is not None and overlaps(other.path, spec.path):
                raise InvalidSpec(f"path {spec.path} overlaps pool {other.name!r} ({other.path})", field="path")
        rec = PoolRecord(
            name=spec.name, path=spec.path, shared=spec.shared, capacity_bytes=spec.capacity_bytes,
            overcommit=float(spec.overcommit), warn_free_pct=spec.warn_free_pct, description=spec.description,
        )  # fmt: skip
        await self.vms.agents.refresh(force=True)
        hosts = self.vms.agents.names()
        for host in hosts[:1] if rec.shared else hosts:  # the agent makes the directory and measures it
            try:
                (u,) = await self.vms.agents.get(host).pool_usage([rec.ref()])
            except (AgentUnavailable, OperationTimeout) as e:
                raise AgentUnavailable(f"cannot make pool {spec.name!r} on host {host}: {e.message}") from None
            if not u.exists or not u.writable:
                with contextlib.suppress(KasouError):
                    await self._forget_everywhere(spec.name)
                raise InvalidSpec(f"pool {spec.name!r}: {u.error or u.path + ' is not writable'} on host {host}",
                                  field="path")  # fmt: skip
        try:
            await self.store.create(pool_key(spec.name), rec.model_dump(mode="json"))
        except StoreConflict:
            raise AlreadyExists(f"a pool named {spec.name!r} already exists") from None
        return await self.view(rec)

    async def delete(self, name: str) -> None:
        rec = await self.get_record(name)
        if rec.name == DEFAULT_POOL:
            raise InvalidSpec("the built-in pool cannot be deleted", field="pool")
        users = sorted({r.name for r in await self.vms.records.all() if disks_in([r], name, None, True)})
        if users or self._reserved_in(name):
            raise Conflict(f"pool {name!r} holds disks of {', '.join(users) or 'a VM being created'}; "
                           "move or delete them first")  # fmt: skip
        await self.store.delete(pool_key(name))
        await self._forget_everywhere(name)

    async def _forget_everywhere(self, name: str) -> None:
        for host in self.vms.agents.names():
            with contextlib.suppress(KasouError):
                await self.vms.agents.get(host).forget_pool(name)

    def _reserved_in(self, pool: str) -> bool:
        return any(p == pool and n > 0 for (p, _h), n in self._reserved.items())

    async def _host_views(self, rec: PoolRecord, records: list[VMRecord]) -> list[PoolHostView]:
        hosts = self.vms.agents.names()
        out = []
        for host in hosts[:1] if rec.shared else hosts:
            provisioned = sum(size for _f, size in disks_in(records, rec.name, host, rec.shared))
            provisioned += self._reserved.get((rec.name, self._host_key(rec, host)), 0)
            try:
                (u,) = await self.vms.agents.get(host).pool_usage([rec.ref()])
            except (AgentUnavailable, OperationTimeout) as e:
                out.append(PoolHostView(host=host, state="unreachable", provisioned_bytes=provisioned, error=e.message))
                continue
            out.append(measure(rec, "*" if rec.shared else host, u, provisioned))
        return out

    async def view(self, rec: PoolRecord, records: list[VMRecord] | None = None) -> PoolView:
        records = records if records is not None else await self.vms.records.all()
        return PoolView(
            name=rec.name, path=rec.path, shared=rec.shared, capacity_bytes=rec.capacity_bytes,
            overcommit=rec.overcommit, warn_free_pct=rec.warn_free_pct, description=rec.description,
            disks=len(disks_in(records, rec.name, None, True)), hosts=await self._host_views(rec, records),
        )  # fmt: skip

    async def list_all(self) -> list[PoolView]:
        await self.vms.agents.refresh()
        records = await self.vms.records.all()
        return [await self.view(p, records) for p in await self.records()]

    async def get(self, name: str) -> PoolView:
        return await self.view(await self.get_record(name))

    # -- room for a new disk ---------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def reserve(self, wants: list[tuple[str, str, int, int]]) -> AsyncIterator[None]:
        """Check and hold room for new disks: (pool, host, virtual size, bytes it holds from the start) each.

        Raises with the numbers if a pool has no room; the room is held until the block ends (by
        then the disks are in the VM's record, or were not made).
        """
        async with self._lock:
            held: list[tuple[str, str, int]] = []
            for pool, host, size, initial in wants:
                rec = await self.get_record(pool)
                await self._check_room(rec, host, size, initial)
                key = (rec.name, self._host_key(rec, host))
                self._reserved[key] = self._reserved.get(key, 0) + size
                held.append((rec.name, key[1], size))
        try:
            yield
        finally:
            for pool, hk, size in held:
                self._reserved[(pool, hk)] -= size

    async def _check_room(self, rec: PoolRecord, host: str, size: int, initial: int) -> None:
        records = await self.vms.records.all()
        provisioned = sum(s for _f, s in disks_in(records, rec.name, host, rec.shared))
        provisioned += self._reserved.get((rec.name, self._host_key(rec, host)), 0)
        try:
            (u,) = await self.vms.agents.get(host).pool_usage([rec.ref()])
        except (AgentUnavailable, OperationTimeout) as e:
            raise AgentUnavailable(f"cannot measure pool {rec.name!r} on host {host}: {e.message}") from None
        v = measure(rec, host, u, provisioned)
        where = f"pool {rec.name!r}" + ("" if rec.shared else f" on host {host}")
        if v.state == "missing":
            raise InsufficientResources(f"{where} is not usable: {v.error}")
        if provisioned + size > v.limit_bytes:
            raise InsufficientResources(
                f"{where}: {format_size(provisioned)} provisioned + {format_size(size)} requested would pass its "
                f"limit of {format_size(v.limit_bytes)} (capacity {format_size(v.capacity_bytes)} x over-commit "
                f"{rec.overcommit:g})"
            )
        if initial + FULL_BELOW_BYTES > v.free_bytes:
            raise InsufficientResources(
                f"{where} has {format_size(v.free_bytes)} free; the new disk needs {format_size(initial)} "
                f"now plus {format_size(FULL_BELOW_BYTES)} of headroom"
            )

    # -- events ------------------------------------------------------------------------------

    async def tick(self) -> None:
        """Raise an event for a pool low on space, full or missing (once), and say when it recovered."""
        records = await self.vms.records.all()
        for rec in await self.records():
            for v in await self._host_views(rec, records):
                if v.state != "unreachable":
                    await self._report(rec, v)

    async def _report(self, rec: PoolRecord, v: PoolHostView) -> None:
        where = f"pool {rec.name}" + ("" if rec.shared else f" on host {v.host}")
        keys = {s: f"pool/{rec.name}/{v.host}/{s}" for s in ("low", "full", "missing")}
        free = f"{format_size(v.free_bytes)} free of {format_size(v.capacity_bytes)}"
        for state, key in keys.items():
            if state != v.state:
                over = v.state == "ok"
                await self.vms.events.clear(key, "pool_space_ok" if over else None, f"{where} has room again ({free})"
                                            if over else None)  # fmt: skip
        sev: Severity = "error"
        if v.state == "missing":
            kind, msg = "pool_missing", f"{where} is not usable: {v.error}"
        elif v.state == "full":
            kind, msg = "pool_full", f"{where} is full: {free}"
        elif v.state == "low":
            kind, msg, sev = (
                "pool_low_space",
                f"{where} is low on space: {free} (warning below {rec.warn_free_pct} %)",
                "warning",
            )
        else:
            return
        await self.vms.events.raise_once(keys[v.state], kind, f"pool/{rec.name}", msg, sev)
