"""Vendor maintenance windows: when a vendor may act, on which VMs, with which permissions.

A vendor (role ``vendor``) can do nothing on a VM outside an approved window: a window names the vendor, the
VMs (of the vendor's departments), the permissions it grants (a subset of the vendor role's), a time span and
the stated work plan. It is requested (by the vendor, an administrator, an operator or the department's manager)
and approved by an administrator or a manager of every department it touches who is not its requester; it can be
denied, revoked, and it expires at its end. No I/O here.
"""

from __future__ import annotations

import time
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict

from kasou.errors import InvalidSpec, NotFound
from kasou.model.names import validate_name
from kasou.model.parsing import parse_model
from kasou.model.users import PERMISSIONS, Role

MAX_LENGTH_S = 7 * 86400  # a window is at most a week long
MIN_LENGTH_S = 60
MAX_AHEAD_S = 366 * 86400  # asked for at most a year ahead
PLAN_MAX = 4000
MAX_VMS = 50
ID_PREFIX = "mw-"
#: What a window may grant: the vendor role's permissions.
GRANTABLE = PERMISSIONS[Role.VENDOR]


def check_id(window_id: str) -> str:
    """A window's id (``mw-`` and 10 hex digits); anything else is answered as an unknown window."""
    hexpart = window_id[len(ID_PREFIX) :] if isinstance(window_id, str) else ""
    if not window_id.startswith(ID_PREFIX) or len(hexpart) != 10 or any(c not in "0123456789abcdef" for c in hexpart):
        raise NotFound(f"no maintenance window {str(window_id)[:40]!r}")
    return window_id


class WindowState(StrEnum):
    REQUESTED = "requested"
    APPROVED = "approved"
    DENIED = "denied"
    REVOKED = "revoked"
    EXPIRED = "expired"  # shown only: its end passed while it was requested or approved


class WindowRequest(BaseModel):
    """What ``kasou maintenance-window request`` and ``POST /v1/maintenance-windows`` take (UNIX times)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    vendor: str
    vms: list[str]
    starts_at: float | int
    ends_at: float | int
    plan: str
    permissions: list[str] | None = None  # None: everything the vendor role holds

    @classmethod
    def parse(cls, data: Any, now: float | None = None) -> WindowRequest:
        spec: WindowRequest = parse_model(cls, data)
        spec.check(time.time() if now is None else now)
        return spec

    def check(self, now: float) -> None:
        validate_name(self.vendor, "user")
        if not self.vms:
            raise InvalidSpec("a maintenance window names at least one VM (--vms)", field="vms")
        if len(self.vms) > MAX_VMS:
            raise InvalidSpec(f"a maintenance window names at most {MAX_VMS} VMs", field="vms")
        for vm in self.vms:
            validate_name(vm, "VM")
        if len(set(self.vms)) != len(self.vms):
            raise InvalidSpec("a VM is named twice", field="vms")
        if self.permissions is not None:
            if not self.permissions:
                raise InvalidSpec("a maintenance window grants at least one permission", field="permissions")
            bad = [p for p in self.permissions if p not in GRANTABLE]
            if bad:
                raise InvalidSpec(f"a maintenance window grants only {', '.join(sorted(GRANTABLE))}, not "
                                  f"{', '.join(repr(p)[:40] for p in bad[:3])}", field="permissions")  # fmt: skip
            if len(set(self.permissions)) != len(self.permissions):
                raise InvalidSpec("a permission is given twice", field="permissions")
        plan = self.plan.strip()
        if not plan or len(self.plan) > PLAN_MAX:
            raise InvalidSpec(f"the work plan (--plan) says what will be done, in 1 to {PLAN_MAX} characters",
                              field="plan")  # fmt: skip
        if any(not (c.isprintable() or c in "\n\t") for c in self.plan):
            raise InvalidSpec("the work plan holds control characters", field="plan")
        start, end = float(self.starts_at), float(self.ends_at)
        if not (start == start and end == end) or start < 0 or end < 0:
            raise InvalidSpec("a window's times are UNIX times", field="starts_at")
        if end <= start:
            raise InvalidSpec("a window ends after it starts (--to after --from)", field="ends_at")
        if end - start < MIN_LENGTH_S:
            raise InvalidSpec(f"a window lasts at least {MIN_LENGTH_S} s", field="ends_at")
        if end - start > MAX_LENGTH_S:
            raise InvalidSpec(f"a window lasts at most {MAX_LENGTH_S // 86400} days, not "
                              f"{(end - start) / 86400:.1f}", field="ends_at")  # fmt: skip
        if end <= now:
            raise InvalidSpec("the window would end in the past", field="ends_at")
        if start > now + MAX_AHEAD_S:
            raise InvalidSpec("a window is requested at most a year ahead", field="starts_at")

    @property
    def granted(self) -> list[str]:
        return sorted(self.permissions if self.permissions is not None else GRANTABLE)


class WindowRecord(BaseModel):
    """A window as the store keeps it (``maintenance-windows/<id>``)."""

    id: str
    vendor: str
    departments: list[str]  # the vendor's departments when it was requested
    vms: list[str]
    vm_uuids: dict[str, str]  # VM name -> its uuid when requested: a later VM of the same name is not covered
    vm_departments: dict[str, str] = {}  # VM name -> its department when requested (empty in older records)
    permissions: list[str]
    starts_at: float
    ends_at: float
    plan: str
    state: WindowState = WindowState.REQUESTED  # requested, approved, denied or revoked (expired is derived)
    requested_by: str
    requested_at: float
    decided_by: str | None = None  # who approved or denied it
    decided_at: float | None = None
    revoked_by: str | None = None
    revoked_at: float | None = None

    def touched_departments(self) -> set[str]:
        """The departments of the VMs it names (older records: the vendor's departments)."""
        return set(self.vm_departments.values()) or set(self.departments)

    def seen_by(self, departments: tuple[str, ...] | list[str]) -> bool:
        """Does it name a VM of one of ``departments`` (a manager of one of them sees it)?"""
        return bool(self.touched_departments() & set(departments))

    def foreign_to(self, departments: tuple[str, ...] | list[str]) -> list[str]:
        """The departments it touches that are not among ``departments`` (a manager decides only with none)."""
        return sorted(self.touched_departments() - set(departments))

    def shown_state(self, now: float) -> WindowState:
        if self.state in (WindowState.REQUESTED, WindowState.APPROVED) and self.ends_at <= now:
            return WindowState.EXPIRED
        return self.state

    def is_active(self, now: float) -> bool:
        """Approved, and now within its span: the vendor may act."""
        return self.state == WindowState.APPROVED and self.starts_at <= now < self.ends_at

    def grants(self, vm_uuid: str | None, wanted: tuple[str, ...], now: float) -> bool:
        """Does it let its vendor do what needs one of ``wanted`` on the VM of ``vm_uuid`` now?"""
        return (
            self.is_active(now)
            and vm_uuid is not None
            and vm_uuid in self.vm_uuids.values()
            and any(p in self.permissions for p in wanted)
        )


class WindowView(WindowRecord):
    state: WindowState
    active: bool = False  # approved and now within its span

    @classmethod
    def of(cls, rec: WindowRecord, now: float) -> WindowView:
        data = rec.model_dump()
        data.update(state=rec.shown_state(now), active=rec.is_active(now))
        return cls(**data)


class WindowReport(BaseModel):
    """What was done in a window, against its stated plan (``kasou maintenance-window report``)."""

    window: WindowView
    plan: str
    actions: list[dict[str, Any]]  # the audit records made under the window, oldest first
    summary: dict[str, int]  # action -> how many
    refused: int  # of those, how many were refused
