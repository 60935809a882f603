"""Desktop pools in the control plane: records, assignment to signed-in users, reset, pre-start.

Records in the store:

* ``desktop-pools/<pool>``: the pool's spec (:class:`DesktopPoolCreate`), its desktops and state;
* ``desktops/<vm>``: one desktop: its pool, and while it is in use its user, the session it was
  handed to (the SHA-256 of the session token, as ``sessions/`` keeps it) and since when.

A desktop is a linked clone of the pool's template (a qcow2 overlay on the template's disk). A
non-persistent desktop is reset when its session ends (sign-out, the session's idle log-off or
maximum age, the pool's own idle time): the VM is stopped, its overlay file deleted and a new,
empty overlay made on the template's disk. Nothing the session wrote survives, because everything
it wrote is in the overlay that no longer exists; the template's disk is never written.

A background tick (from the reconciler, every 2 s) returns the desktops of ended sessions, retries
resets that failed, and keeps ``prestart`` free desktops booted so a sign-in gets one at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from kasou.agent.models import DiskCreate
from kasou.config import session_idle_s, session_max_s
from kasou.control.desktop_records import (
    DesktopPoolRecord,
    DesktopPoolView,
    DesktopRecord,
    DesktopView,
    PortalPool,
    session_id,
)
from kasou.control.jobs import JobContext
from kasou.control.records import JobRecord, VMRecord
from kasou.control.users import SESSIONS_PREFIX, SessionRecord, Users
from kasou.errors import (
    AlreadyExists,
    Forbidden,
    InsufficientResources,
    InvalidSpec,
    KasouError,
    NotFound,
    StoreConflict,
    Unauthorized,
    WrongState,
)
from kasou.model.desktops import (
    ConsolePolicy,
    DesktopPoolCreate,
    DesktopPoolResize,
    check_sizes,
    desktop_name,
    validate_pool_name,
)
from kasou.model.names import validate_name
from kasou.model.spec import VMCreate
from kasou.model.state import ACTIVE_STATES, Action, VMState

if TYPE_CHECKING:
    from kasou.control.base import VMControl

log = logging.getLogger(__name__)

POOLS_PREFIX = "desktop-pools/"
DESKTOPS_PREFIX = "desktops/"
VM_JOB_TIMEOUT_S = 300.0  # one clone's create, start or delete
CONSOLE_PAGE = "/ui/console.html?vm="


class Desktops:
    """Desktop pools, attached as ``VMService.desktops``."""

    def __init__(self, vms: VMControl) -> None:
        self.vms = vms
        self.store = vms.store
        self.users = Users(vms.store)
        self._tasks: set[asyncio.Task[Any]] = set()

    # -- records -------------------------------------------------------------------------

    async def _desktop(self, vm: str) -> DesktopRecord | None:
        e = await self.store.get(DESKTOPS_PREFIX + vm)
        return DesktopRecord.model_validate(e.value) if e is not None else None

    async def _desktops(self, pool: str | None = None) -> list[DesktopRecord]:
        out = [DesktopRecord.model_validate(e.value) for e in await self.store.range(DESKTOPS_PREFIX)]
        return [d for d in out if pool is None or d.pool == pool]

    async def _pool(self, name: str) -> DesktopPoolRecord:
        validate_pool_name(name)
        e = await self.store.get(POOLS_PREFIX + name)
        if e is None:
            raise NotFound(f"no desktop pool named {name!r}")
        return DesktopPoolRecord.model_validate(e.value)

    async def _pools(self) -> list[DesktopPoolRecord]:
        return [DesktopPoolRecord.model_validate(e.value) for e in await self.store.range(POOLS_PREFIX)]

    async def _cas(self, key: str, model: Any, fn: Callable[[Any], Any]) -> Any:
        """Read-modify-write one record with compare-and-swap; ``fn`` returns None to leave it, or raises."""
        for _ in range(20):
            e = await self.store.get(key)
            if e is None:
                raise NotFound(f"no record {key}")
            cur = model.model_validate(e.value)
            new = fn(cur)
            if new is None:
                return None
            try:
                await self.store.put(key, new.model_dump(mode="json"), expect_rev=e.mod_rev)
                return new
            except StoreConflict:
                await asyncio.sleep(0.01)
        raise StoreConflict(f"{key} keeps changing; try again")

    async def _set_desktop(self, vm: str, fn: Callable[[DesktopRecord], DesktopRecord | None]) -> DesktopRecord | None:
        r: DesktopRecord | None = await self._cas(DESKTOPS_PREFIX + vm, DesktopRecord, fn)
        return r

    async def _pool_desktops(self, pool: str, add: str | None = None, remove: str | None = None) -> None:
        def fn(p: DesktopPoolRecord) -> DesktopPoolRecord:
            names = [d for d in p.desktops if d != remove] + ([add] if add else [])
            return p.model_copy(update={"desktops": sorted(set(names))})

        await self._cas(POOLS_PREFIX + pool, DesktopPoolRecord, fn)

    async def _set_pool(self, name: str, **changes: Any) -> None:
        await self._cas(POOLS_PREFIX + name, DesktopPoolRecord, lambda p: p.model_copy(update=changes))

    # -- what the console asks --------------------------------------------------------------

    async def user_may_open(self, user: str, vm: str) -> bool:
        """True only for the desktop assigned to ``user`` now (the console's check for a clinician)."""
        try:
            validate_name(vm)
        except InvalidSpec:
            return False
        d = await self._desktop(vm)
        return d is not None and d.state == "assigned" and d.user == user

    async def console_policy(self, vm: str) -> ConsolePolicy:
        """What the console of ``vm`` may carry besides the screen: its pool's allowances, else nothing."""
        try:
            validate_name(vm)
        except InvalidSpec:
            return ConsolePolicy()
        d = await self._desktop(vm)
        if d is None:
            return ConsolePolicy()
        try:
            pool = await self._pool(d.pool)
        except NotFound:
            return ConsolePolicy()
        return pool.spec.policy()

    # -- views ---------------------------------------------------------------------------

    async def _vm_views(self) -> dict[str, Any]:
        return {v.name: v for v in await self.vms.list_all()}

    def _desktop_view(self, d: DesktopRecord, vms: dict[str, Any]) -> DesktopView:
        v = vms.get(d.vm)
        assigned = d.state == "assigned"
        return DesktopView(
            vm=d.vm, pool=d.pool, state=d.state, user=d.user, since=d.since if assigned else None,
            vm_state=v.state if v is not None else None, guest_ready=bool(v is not None and v.guest_ready),
            console=CONSOLE_PAGE + d.vm,
        )  # fmt: skip

    def _pool_view(self, p: DesktopPoolRecord, desktops: list[DesktopRecord], vms: dict[str, Any]) -> DesktopPoolView:
        s = p.spec
        views = [self._desktop_view(d, vms) for d in sorted(desktops, key=lambda d: d.vm)]
        return DesktopPoolView(
            name=s.name, template=s.template, state=p.state, size=s.size, prestart=s.prestart,
            persistent=s.persistent, idle_minutes=s.idle_minutes, allow_clipboard=s.allow_clipboard,
            allow_file_transfer=s.allow_file_transfer, allow_usb=s.allow_usb, record=s.record,
            description=s.description,
            created_at=p.created_at, in_use=sum(1 for d in views if d.state == "assigned"),
            free_ready=sum(1 for d in views if d.state == "free" and d.user is None and d.guest_ready),
            desktops=views,
        )  # fmt: skip

    async def list_pools(self) -> list[DesktopPoolView]:
        vms = await self._vm_views()
        desktops = await self._desktops()
        return [self._pool_view(p, [d for d in desktops if d.pool == p.spec.name], vms) for p in await self._pools()]

    async def get_pool(self, name: str) -> DesktopPoolView:
        p = await self._pool(name)
        return self._pool_view(p, await self._desktops(name), await self._vm_views())

    # -- operators: create, resize, delete --------------------------------------------------

    async def _template(self, name: str) -> VMRecord:
        try:
            t = await self.vms.records.get(name)
        except NotFound:
            raise InvalidSpec(f"unknown template {name!r}", field="template") from None
        if t.state != VMState.TEMPLATE:
            raise InvalidSpec(
                f"{name!r} is not a template; make it one with: kasou vm template {name}", field="template"
            )
        return t

    async def _check_free_names(self, names: list[str]) -> None:
        taken = [n for n in names if await self.store.get(f"vms/{n}") is not None]
        if taken:
            raise AlreadyExists(f"VMs named {', '.join(taken)} exist already; choose another pool name")

    async def create_pool(self, spec: DesktopPoolCreate) -> tuple[DesktopPoolView, JobRecord]:
        """Record the pool and make its desktops (a job); the tick then pre-starts ``prestart`` of them."""
        spec.check()
        t = await self._template(spec.template)
        names = [desktop_name(spec.name, i) for i in range(1, spec.size + 1)]
        if await self.store.get(POOLS_PREFIX + spec.name) is not None:
            raise AlreadyExists(f"a desktop pool named {spec.name!r} already exists")
        await self._check_free_names(names)
        rec = DesktopPoolRecord(spec=spec, state="creating", desktops=[])
        try:
            await self.store.create(POOLS_PREFIX + spec.name, rec.model_dump(mode="json"))
        except StoreConflict:
            raise AlreadyExists(f"a desktop pool named {spec.name!r} already exists") from None

        async def run(ctx: JobContext) -> dict[str, Any]:
            try:
                made = await self._make_desktops(ctx, spec.name, t, names)
            except BaseException:
                await self._remove_desktops(spec.name, names)
                await self.store.delete(POOLS_PREFIX + spec.name)
                raise
            await self._set_pool(spec.name, state="ready")
            await self._prestart(spec.name)
            return {"pool": spec.name, "desktops": made}

        job = await self.vms.jobs.submit("pool-desktop-create", None, run)
        return self._pool_view(rec, [], {}), job

    async def _make_desktops(self, ctx: JobContext, pool: str, t: VMRecord, names: list[str]) -> list[str]:
        made = []
        for i, name in enumerate(names):
            await ctx.progress(i / max(1, len(names)), f"creating desktop {name} (linked clone of {t.name})")
            body = {"name": name, "template": t.name, "vcpus": t.vcpus, "memory_mib": t.memory_mib}
            spec = VMCreate.model_validate({**body, "description": f"desktop of pool {pool}"})
            _, job = await self.vms.create(spec)
            done = await self.vms.jobs.wait(job.id, VM_JOB_TIMEOUT_S)
            if done.error:
                raise KasouError(f"creating desktop {name} failed: {done.error['message']}")
            await self.store.put(DESKTOPS_PREFIX + name, DesktopRecord(vm=name, pool=pool).model_dump(mode="json"))
            await self._pool_desktops(pool, add=name)
            made.append(name)
        return made

    async def _remove_desktops(self, pool: str, names: list[str]) -> None:
        """Delete these desktops' VMs (stopping them) and records; each wait bounded."""
        for name in names:
            for _ in range(60):  # a VM busy with a job (a start, a reset) is deleted when that ends
                try:
                    job = await self.vms.delete(name, force=True)
                except NotFound:
                    break
                except WrongState:
                    await asyncio.sleep(0.5)
                    continue
                await self.vms.jobs.wait(job.id, VM_JOB_TIMEOUT_S)
                break
            await self.store.delete(DESKTOPS_PREFIX + name)
            with contextlib.suppress(NotFound):
                await self._pool_desktops(pool, remove=name)

    async def delete_pool(self, name: str, force: bool = False) -> JobRecord:
        """Delete a pool and its desktops; refused while desktops are in use unless ``force``."""
        p = await self._pool(name)
        if p.state in ("creating", "resizing", "deleting"):
            raise WrongState(f"desktop pool {name!r} is {p.state}; try again when that ends")
        busy = [d for d in await self._desktops(name) if d.state == "assigned"]
        if busy and not force:
            who = ", ".join(f"{d.vm} ({d.user})" for d in busy)
            raise WrongState(f"desktop pool {name!r} has desktops in use: {who}; give --force to delete anyway")
        await self._set_pool(name, state="deleting")

        async def run(ctx: JobContext) -> dict[str, Any]:
            await ctx.progress(0.1, f"deleting {len(p.desktops)} desktops")
            await self._remove_desktops(name, list(p.desktops))
            await self.store.delete(POOLS_PREFIX + name)
            return {"pool": name, "deleted": True}

        return await self.vms.jobs.submit("pool-desktop-delete", None, run)

    async def resize(self, name: str, upd: DesktopPoolResize) -> tuple[DesktopPoolView, JobRecord | None]:
        """Change a pool's size (new desktops made, free ones with the highest numbers deleted) or prestart."""
        p = await self._pool(name)
        if p.state != "ready":
            raise WrongState(f"desktop pool {name!r} is {p.state}; try again when that ends")
        size = p.spec.size if upd.size is None else upd.size
        prestart = p.spec.prestart if upd.prestart is None else upd.prestart
        check_sizes(size, prestart)
        desktops = {d.vm: d for d in await self._desktops(name)}
        current = sorted(p.desktops)
        job: JobRecord | None = None
        if size > len(current):
            t = await self._template(p.spec.template)
            free = [desktop_name(name, i) for i in range(1, 100) if desktop_name(name, i) not in current]
            add = free[: size - len(current)]
            await self._check_free_names(add)
        else:
            add = []
        drop = current[size:] if size < len(current) else []
        in_use = [n for n in drop if n in desktops and desktops[n].state != "free"]
        if in_use:
            raise WrongState(f"cannot shrink desktop pool {name!r} to {size}: {', '.join(in_use)} in use")
        spec = p.spec.model_copy(update={"size": size, "prestart": prestart,
                                         "record": p.spec.record if upd.record is None else upd.record})  # fmt: skip
        if not add and not drop:
            await self._set_pool(name, spec=spec)
            return await self.get_pool(name), None
        await self._set_pool(name, spec=spec, state="resizing")

        async def run(ctx: JobContext) -> dict[str, Any]:
            try:
                made = await self._make_desktops(ctx, name, t, add) if add else []
                await self._remove_desktops(name, drop)
            finally:
                await self._set_pool(name, state="ready")
            await self._prestart(name)
            return {"pool": name, "added": made, "removed": drop}

        job = await self.vms.jobs.submit("pool-desktop-resize", None, run)
        return await self.get_pool(name), job

    # -- the portal: a signed-in user's desktop --------------------------------------------

    @staticmethod
    def _check_entitled(user: str, entitled: tuple[str, ...] | list[str], pool: str) -> None:
        if pool not in entitled:
            raise Forbidden(f"user {user!r} is not entitled to desktop pool {pool!r}")

    async def portal_pools(self, user: str, entitled: tuple[str, ...] | list[str]) -> list[PortalPool]:
        desktops = await self._desktops()
        out = []
        for name in entitled:
            try:
                p = await self._pool(name)
            except (NotFound, InvalidSpec):
                continue
            mine = [d.vm for d in desktops if d.pool == name and d.state == "assigned" and d.user == user]
            free = sum(1 for d in desktops if d.pool == name and d.state == "free" and d.user in (None, user))
            out.append(PortalPool(name=name, description=p.spec.description, size=p.spec.size, free=free,
                                  my_desktop=mine[0] if mine else None))  # fmt: skip
        return out

    async def my_desktops(self, user: str) -> list[DesktopView]:
        mine = [d for d in await self._desktops() if d.state == "assigned" and d.user == user]
        if not mine:
            return []
        vms = await self._vm_views()
        return [self._desktop_view(d, vms) for d in mine]

    async def acquire(self, user: str, session_token: str | None, entitled: tuple[str, ...], pool: str) -> DesktopView:
        """The user's desktop of ``pool``: the same one again while the session lasts; else a free
        pre-started one at once, else a free one started now. Exhausted: a clear 409."""
        if session_token is None:
            raise Unauthorized("the desktop portal needs a signed-in user (not the API token): sign in")
        validate_pool_name(pool)
        self._check_entitled(user, entitled, pool)
        p = await self._pool(pool)
        if p.state not in ("ready", "resizing"):
            raise WrongState(f"desktop pool {pool!r} is {p.state}; try again in a moment")
        sid = session_id(session_token)
        desktops = await self._desktops(pool)
        for d in desktops:
            if d.state == "assigned" and d.user == user:  # the same desktop again (also from another sign-in)
                await self._set_desktop(d.vm, lambda r: r.model_copy(update={"session": sid}))
                return await self._view_one(d.vm)
        vms = await self._vm_views()

        def rank(d: DesktopRecord) -> tuple[int, int, str]:
            v = vms.get(d.vm)
            owned = 0 if d.user == user else 1
            if v is None:
                return (owned, 9, d.vm)
            up = 0 if v.guest_ready else (1 if v.state in ACTIVE_STATES else 2)
            return (owned, up, d.vm)

        candidates = [
            d for d in desktops if d.state == "free" and d.vm in vms and (d.user is None or d.user == user)
        ]  # in a persistent pool a desktop keeps its owner: only they get it again
        for d in sorted(candidates, key=rank):
            got = await self._set_desktop(d.vm, functools.partial(self._assign, user=user, sid=sid))
            if got is None:
                continue  # someone else took it meanwhile
            try:
                await self._ensure_running(d.vm)
            except BaseException:
                await self._set_desktop(d.vm, lambda r: r.model_copy(update={"state": "free", "session": None,
                                                                              "since": None}))  # fmt: skip
                raise
            self._spawn(self._prestart(pool))  # the next sign-in finds one waiting too
            return await self._view_one(d.vm)
        in_use = sum(1 for d in desktops if d.state != "free")
        raise InsufficientResources(
            f"desktop pool {pool!r} is exhausted: {in_use} of its {len(desktops)} desktops are in use or being "
            "reset; try again in a few minutes or ask IT to enlarge the pool"
        )

    @staticmethod
    def _assign(r: DesktopRecord, user: str, sid: str) -> DesktopRecord | None:
        if r.state != "free" or r.user not in (None, user):
            return None
        return r.model_copy(update={"state": "assigned", "user": user, "session": sid, "since": time.time(),
                                    "clean": False})  # fmt: skip

    async def _view_one(self, vm: str) -> DesktopView:
        d = await self._desktop(vm)
        if d is None:
            raise NotFound(f"no desktop {vm!r}")
        try:
            v = await self.vms.get(vm)
            vms = {vm: v}
        except NotFound:
            vms = {}
        return self._desktop_view(d, vms)

    async def _ensure_running(self, vm: str) -> None:
        """Start a stopped desktop now (bounded wait for the start job); one being started is left to it."""
        rec = await self.vms.records.get(vm)
        if rec.state in ACTIVE_STATES:
            return
        if rec.job is not None:
            job = await self.vms.jobs.wait(rec.job, VM_JOB_TIMEOUT_S)
            rec = await self.vms.records.get(vm)
            if rec.state in ACTIVE_STATES:
                return
            if job.kind == "desktop-reset" and job.error is None:
                pass  # reset, now stopped: start it below
        job = await self.vms.action(vm, Action.START)
        done = await self.vms.jobs.wait(job.id, VM_JOB_TIMEOUT_S)
        if done.error:
            raise KasouError(f"desktop {vm} could not be started: {done.error['message']}")

    async def release(self, user: str, session_token: str | None = None, pool: str | None = None) -> list[str]:
        """Return the user's desktops (of one session, of one pool) to their pools; non-persistent ones are reset."""
        sid = session_id(session_token) if session_token else None
        out = []
        for d in await self._desktops(pool):
            if d.state == "assigned" and d.user == user and (sid is None or d.session == sid):
                await self._return(d, "released")
                out.append(d.vm)
        return out

    async def on_logout(self, user: str, session_token: str) -> None:
        """A ``Services.logout_hooks`` hook: sign-out returns the session's desktops."""
        try:
            await self.release(user, session_token)
        except KasouError:
            log.exception("returning the desktops of %s at sign-out failed (the tick retries)", user)

    async def _return(self, d: DesktopRecord, why: str) -> None:
        pool = await self._pool(d.pool)
        if pool.spec.persistent:  # it stays its user's; nothing is reset
            await self._set_desktop(d.vm, lambda r: r.model_copy(update={"state": "free", "session": None,
                                                                          "since": None}))  # fmt: skip
            log.info("desktop %s returned (%s); kept for %s (persistent pool)", d.vm, why, d.user)
            return
        await self._set_desktop(d.vm, lambda r: r.model_copy(update={"state": "resetting", "session": None,
                                                                      "since": None}))  # fmt: skip
        log.info("desktop %s of %s returned (%s); resetting it", d.vm, d.user, why)
        await self.reset(d.vm)

    # -- reset ---------------------------------------------------------------------------

    async def reset(self, vm: str) -> JobRecord | None:
        """Reset a desktop to its template's clean state (a job); None if its VM is busy (the tick retries)."""
        job_id = self.vms.new_job_id()

        def claim(r: VMRecord) -> VMRecord | None:
            if r.job is not None:
                return None
            return r.model_copy(update={"job": job_id})

        rec = await self.vms.records.update(vm, claim)
        if rec is None or rec.job != job_id:
            return None

        async def run(ctx: JobContext) -> dict[str, Any]:
            await self._do_reset(ctx, vm)
            return {"vm": vm, "reset": True}

        async def done(job: JobRecord) -> None:
            await self.vms.runner.release(job)
            if job.error is None:
                d = await self._desktop(vm)
                if d is not None:
                    self._spawn(self._prestart(d.pool))

        return await self.vms.jobs.submit("desktop-reset", vm, run, on_done=done, job_id=job_id)

    async def _do_reset(self, ctx: JobContext, vm: str) -> None:
        rec = await self.vms.records.get(vm)
        if rec.template is None or not rec.disks or rec.disks[0].path is None:
            raise WrongState(f"desktop {vm} is not a linked clone; it cannot be reset")
        agent = self.vms.agents.get(rec.host)
        if rec.state in ACTIVE_STATES:
            await ctx.progress(0.1, "stopping the desktop")
            await agent.action(vm, "stop")
            await self.vms.stopped(rec, "stopped to reset the desktop to its template")
        template = await self.vms.records.get(rec.template)
        disk = rec.disks[0]
        await ctx.progress(0.5, "replacing its disk with a fresh overlay on the template")
        await agent.delete_disk(disk.path or "")
        info = await agent.create_disk(DiskCreate(vm=vm, disk_id=disk.id, size_bytes=disk.size_bytes,
                                                  source="overlay", backing=template.disks[0].path))  # fmt: skip
        new = disk.model_copy(update={"path": info.path, "size_bytes": info.size_bytes, "backing": info.backing})
        await self.vms.records.set(vm, disks=[new, *rec.disks[1:]])
        await self._set_desktop(vm, lambda r: r.model_copy(update={
            "state": "free", "user": None, "session": None, "since": None, "clean": True}))  # fmt: skip

    # -- the tick --------------------------------------------------------------------------

    def _spawn(self, coro: Any) -> None:
        t = asyncio.create_task(coro)
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)

    async def _session(self, sid: str) -> SessionRecord | None:
        e = await self.store.get(SESSIONS_PREFIX + sid)
        return SessionRecord.model_validate(e.value) if e is not None else None

    async def _session_over(self, d: DesktopRecord, idle_minutes: int | None) -> str | None:
        """Why the session a desktop was handed to is over, or None while it lasts."""
        if d.session is None:
            return "it has no session"
        s = await self._session(d.session)
        now = time.time()
        if s is None:
            return "the user signed out"
        if now - s.last_used > session_idle_s() or now - s.created_at > session_max_s():
            return "the session ended (idle log-off or maximum age)"
        if idle_minutes is not None and now - s.last_used > idle_minutes * 60:
            return f"idle for more than {idle_minutes} min"
        return None

    async def tick(self) -> None:
        """Return the desktops of ended sessions, retry resets, keep ``prestart`` desktops booted."""
        for p in await self._pools():
            if p.state != "ready":
                continue
            try:
                await self._tick_pool(p)
            except KasouError as e:
                log.warning("desktop pool %s: %s", p.spec.name, e.message)
        with contextlib.suppress(KasouError):
            for sid, _s in await self.users.expired_sessions():  # their desktops were returned above
                await self.users.drop_session(sid)

    async def _tick_pool(self, p: DesktopPoolRecord) -> None:
        for d in await self._desktops(p.spec.name):
            if d.state == "assigned":
                why = await self._session_over(d, p.spec.idle_minutes)
                if why is not None:
                    await self._return(d, why)
            elif d.state == "resetting" or (d.state == "free" and not d.clean and not p.spec.persistent):
                if d.state == "free":
                    await self._set_desktop(d.vm, lambda r: r.model_copy(update={"state": "resetting"}))
                with contextlib.suppress(NotFound):
                    await self.reset(d.vm)
        await self._prestart(p.spec.name)

    async def _prestart(self, pool: str) -> None:
        """Start free desktops until ``prestart`` of them are up or coming up."""
        try:
            p = await self._pool(pool)
        except NotFound:
            return
        free = [d for d in await self._desktops(pool) if d.state == "free" and d.user is None]
        records = {}
        for d in free:
            with contextlib.suppress(NotFound):
                records[d.vm] = await self.vms.records.get(d.vm)
        up = [n for n, r in records.items() if r.state in ACTIVE_STATES or (r.job is not None)]
        need = p.spec.prestart - len(up)
        for name in sorted(n for n, r in records.items() if n not in up):
            if need <= 0:
                break
            try:
                await self.vms.action(name, Action.START)
                need -= 1
            except KasouError as e:
                log.info("pre-starting desktop %s: %s", name, e.message)
                if isinstance(e, InsufficientResources):
                    break
