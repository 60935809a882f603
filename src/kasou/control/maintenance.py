"""Vendor maintenance windows kept in the store (``maintenance-windows/<id>``): requested, approved by an
administrator or by a manager of every department whose VMs it names (the MHLW guideline: access follows the
department's request confirmed by its manager), never by its requester or its vendor; denied, revoked; expired at
their end (derived from the clock). A manager sees only the windows naming a VM of their departments.

The API asks :meth:`MaintenanceWindows.grant` before every VM-scoped route a vendor calls: the id of an active
window of theirs that names the VM (by its uuid when the window was requested) and grants the permission, or
None. The clock is ``clock`` (``time.time`` by default; tests give another).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import secrets
import time
from collections.abc import Callable
from typing import Any

from kasou.control import audit
from kasou.control.events import Events
from kasou.control.records import VMRecord, vm_key
from kasou.errors import Conflict, Forbidden, InvalidSpec, NotFound, StoreConflict
from kasou.model.maintenance import (
    ID_PREFIX,
    WindowRecord,
    WindowReport,
    WindowRequest,
    WindowState,
    WindowView,
    check_id,
)
from kasou.model.users import Role
from kasou.store.base import Store

PREFIX = "maintenance-windows/"
USERS_PREFIX = "users/"  # kasou.control.users keeps users there
REPORT_MAX = 5000  # audit records listed in one report


class MaintenanceWindows:
    def __init__(self, store: Store, clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.clock = clock
        self.events = Events(store)

    async def _tell(self, kind: str, w: WindowView | WindowRecord, message: str) -> None:
        """An operator event (``kasou event list``): administrators see requests waiting for them."""
        with contextlib.suppress(Exception):  # an event that cannot be written never undoes the change
            await self.events.emit(kind, f"maintenance-window/{w.id}", message, "info")

    # -- reading ---------------------------------------------------------------------------------------

    async def _entry(self, window_id: str) -> tuple[WindowRecord, int]:
        e = await self.store.get(PREFIX + check_id(window_id))
        if e is None:
            raise NotFound(f"no maintenance window {window_id!r}")
        return WindowRecord.model_validate(e.value), e.mod_rev

    async def record(self, window_id: str) -> WindowRecord:
        return (await self._entry(window_id))[0]

    async def get(self, window_id: str) -> WindowView:
        return WindowView.of(await self.record(window_id), self.clock())

    async def all(self, vendor: str | None = None) -> list[WindowRecord]:
        out = [WindowRecord.model_validate(e.value) for e in await self.store.range(PREFIX)]
        return sorted((w for w in out if vendor is None or w.vendor == vendor), key=lambda w: (w.starts_at, w.id))

    async def views(self, vendor: str | None = None) -> list[WindowView]:
        now = self.clock()
        return [WindowView.of(w, now) for w in await self.all(vendor)]

    async def views_for(self, by: str, by_role: Role, by_departments: tuple[str, ...]) -> list[WindowView]:
        """The windows this user may see (:func:`visible`), by start."""
        now = self.clock()
        return [WindowView.of(w, now) for w in await self.all() if visible(w, by, by_role, by_departments)]

    async def active_for(self, vendor: str) -> list[WindowRecord]:
        now = self.clock()
        return [w for w in await self.all(vendor) if w.is_active(now)]

    async def grant(self, vendor: str, vm_uuid: str | None, wanted: tuple[str, ...]) -> str | None:
        """The id of an active window of ``vendor`` covering the VM of ``vm_uuid`` for one of ``wanted``."""
        now = self.clock()
        for w in await self.all(vendor):
            if w.grants(vm_uuid, wanted, now):
                return w.id
        return None

    # -- changing --------------------------------------------------------------------------------------

    async def request(self, spec: WindowRequest, by: str, by_role: Role, by_departments: tuple[str, ...]) -> WindowView:
        """A new window in state ``requested``. A vendor asks for themselves only, and for VMs of their departments;
        administrators and operators for any vendor, for VMs of that vendor's departments; a manager for a vendor
        of one of their departments, for VMs of their departments and the vendor's."""
        now = self.clock()
        spec.check(now)
        if by_role == Role.VENDOR and spec.vendor != by:
            raise Forbidden(f"user {by!r} (vendor) may request maintenance windows for themselves only")
        e = await self.store.get(USERS_PREFIX + spec.vendor)
        if e is None or e.value.get("role") != Role.VENDOR.value:
            raise InvalidSpec(f"no vendor user named {spec.vendor!r}", field="vendor")
        departments = [str(d) for d in e.value.get("departments") or []]
        if by_role == Role.MANAGER and not set(departments) & set(by_departments):
            raise InvalidSpec(f"no vendor user named {spec.vendor!r} in your departments ({', '.join(by_departments)})",
                              field="vendor")  # fmt: skip
        uuids: dict[str, str] = {}
        vm_departments: dict[str, str] = {}
        for name in spec.vms:
            v = await self.store.get(vm_key(name))
            rec = VMRecord.model_validate(v.value) if v is not None else None
            if by_role == Role.MANAGER and (rec is None or rec.department not in by_departments):
                raise NotFound(f"no VM named {name!r}")  # a VM of another department: as if it did not exist
            if rec is None or rec.department is None or rec.department not in departments:
                if by_role == Role.VENDOR or rec is None:
                    raise NotFound(f"no VM named {name!r}")  # as everywhere else for a vendor
                raise InvalidSpec(f"VM {name!r} is not of the departments of vendor {spec.vendor!r} "
                                  f"({', '.join(departments)})", field="vms")  # fmt: skip
            uuids[name] = rec.uuid
            vm_departments[name] = rec.department
        wid = ID_PREFIX + secrets.token_hex(5)
        rec_w = WindowRecord(
            id=wid, vendor=spec.vendor, departments=departments, vms=list(spec.vms), vm_uuids=uuids,
            vm_departments=vm_departments,
            permissions=spec.granted, starts_at=float(spec.starts_at), ends_at=float(spec.ends_at),
            plan=spec.plan.strip(), requested_by=by, requested_at=now,
        )  # fmt: skip
        try:
            await self.store.create(PREFIX + wid, rec_w.model_dump(mode="json"))
        except StoreConflict:
            raise Conflict("a maintenance window id was taken twice; try again") from None
        span = f"{_utc(rec_w.starts_at)} to {_utc(rec_w.ends_at)}"
        await self._tell("maintenance_window_requested", rec_w, f"{by} requested maintenance window {wid} for "
                         f"{rec_w.vendor} on {', '.join(rec_w.vms)}, {span}: {rec_w.plan[:200]}")  # fmt: skip
        return WindowView.of(rec_w, now)

    async def _change(self, window_id: str, change: Callable[[WindowRecord, float], dict[str, Any]]) -> WindowView:
        for _ in range(20):
            rec, rev = await self._entry(window_id)
            now = self.clock()
            new = rec.model_copy(update=change(rec, now))
            try:
                await self.store.put(PREFIX + rec.id, new.model_dump(mode="json"), expect_rev=rev)
            except StoreConflict:
                continue
            return WindowView.of(new, now)
        raise Conflict(f"maintenance window {window_id} changed too often at once; try again")

    async def approve(self, window_id: str, by: str, by_role: Role, by_departments: tuple[str, ...] = ()) -> WindowView:
        """An administrator, or a manager of every department whose VMs it names, who neither requested the window
        nor is its vendor approves it."""

        def change(w: WindowRecord, now: float) -> dict[str, Any]:
            decides(w, "approve", by, by_role, by_departments)
            if by == w.requested_by:
                raise Forbidden(f"user {by!r} requested maintenance window {w.id} and may not approve it; "
                                f"{'a manager of its department or ' if by_role == Role.MANAGER else ''}"
                                "another administrator does")  # fmt: skip
            shown = w.shown_state(now)
            if shown != WindowState.REQUESTED:
                raise Conflict(f"maintenance window {w.id} is {shown.value}: only a requested window is approved")
            return {"state": WindowState.APPROVED, "decided_by": by, "decided_at": now}

        w = await self._change(window_id, change)
        await self._tell("maintenance_window_approved", w, f"{by} approved maintenance window {w.id} of {w.vendor}")
        return w

    async def deny(self, window_id: str, by: str, by_role: Role, by_departments: tuple[str, ...] = ()) -> WindowView:
        """An administrator, or a manager of every department whose VMs it names, denies a requested window."""

        def change(w: WindowRecord, now: float) -> dict[str, Any]:
            decides(w, "deny", by, by_role, by_departments)
            if by_role == Role.MANAGER and by == w.requested_by:
                raise Forbidden(f"user {by!r} requested maintenance window {w.id} and may not deny it; revoke it")
            shown = w.shown_state(now)
            if shown != WindowState.REQUESTED:
                raise Conflict(f"maintenance window {w.id} is {shown.value}: only a requested window is denied")
            return {"state": WindowState.DENIED, "decided_by": by, "decided_at": now}

        w = await self._change(window_id, change)
        await self._tell("maintenance_window_denied", w, f"{by} denied maintenance window {w.id} of {w.vendor}")
        return w

    async def revoke(self, window_id: str, by: str, by_role: Role, by_departments: tuple[str, ...] = ()) -> WindowView:
        """End a requested or approved window now: an administrator or operator, a manager of every department whose
        VMs it names (also one they requested), or its own vendor (who gives it up)."""

        def change(w: WindowRecord, now: float) -> dict[str, Any]:
            if by_role == Role.VENDOR and by != w.vendor:
                raise NotFound(f"no maintenance window {w.id!r}")
            if by_role == Role.MANAGER:
                decides(w, "revoke", by, by_role, by_departments)
            shown = w.shown_state(now)
            if shown not in (WindowState.REQUESTED, WindowState.APPROVED):
                raise Conflict(f"maintenance window {w.id} is {shown.value} already")
            return {"state": WindowState.REVOKED, "revoked_by": by, "revoked_at": now}

        w = await self._change(window_id, change)
        await self._tell("maintenance_window_revoked", w, f"{by} revoked maintenance window {w.id} of {w.vendor}")
        return w

    # -- what was done ---------------------------------------------------------------------------------

    async def report(self, window_id: str) -> WindowReport:
        """The audit records made under the window (its id in their details), oldest first, against its plan."""
        w = await self.record(window_id)
        records = await audit.for_store(self.store).records(actor=w.vendor)
        mine = [r for r in records if (r.get("details") or {}).get("window") == w.id][-REPORT_MAX:]
        summary: dict[str, int] = {}
        for r in mine:
            summary[str(r.get("action"))] = summary.get(str(r.get("action")), 0) + 1
        refused = sum(1 for r in mine if not (r.get("result") or {}).get("ok", True))
        actions = [{k: r.get(k) for k in ("seq", "time", "action", "target", "source", "result", "details")}
                   for r in mine]  # fmt: skip
        return WindowReport(window=WindowView.of(w, self.clock()), plan=w.plan, actions=actions, summary=summary,
                            refused=refused)  # fmt: skip


def visible(w: WindowRecord, by: str, by_role: Role, by_departments: tuple[str, ...]) -> bool:
    """May this user see the window: a vendor their own, a manager those naming a VM of their departments,
    everyone else (who reads it through the permission table) any."""
    if by_role == Role.VENDOR:
        return w.vendor == by
    if by_role == Role.MANAGER:
        return w.seen_by(by_departments)
    return True


def decides(w: WindowRecord, verb: str, by: str, by_role: Role, by_departments: tuple[str, ...]) -> None:
    """Refuse unless ``by`` may ``verb`` (approve, deny, revoke as a manager) the window: an administrator, or a
    manager of every department whose VMs it names (one who manages none of them does not even see it: 404);
    never its vendor."""
    if by_role not in (Role.ADMIN, Role.MANAGER):
        raise Forbidden(f"user {by!r} ({by_role.value}) may not {verb} maintenance windows; an administrator or "
                        "the department's manager does")  # fmt: skip
    if by_role == Role.MANAGER:
        if not w.seen_by(by_departments):
            raise NotFound(f"no maintenance window {w.id!r}")
        foreign = w.foreign_to(by_departments)
        if foreign:
            raise Forbidden(f"maintenance window {w.id} names VMs of {', '.join(foreign)}, which user {by!r} "
                            "does not manage; an administrator or a manager of every department it names "
                            f"may {verb} it")  # fmt: skip
    if by == w.vendor:
        raise Forbidden(f"user {by!r} is the vendor of maintenance window {w.id} and may not {verb} it")


def _utc(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
