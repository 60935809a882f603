"""Backup policy in a hospital's words: a schedule and a retention per VM or per department, with defaults
that follow the VM's criticality (the MHLW guideline's example: daily, 5 generations for systems used
around the clock in care, 3 for the others).

Records::

    backup-policy/<vm>              the VM's own settings (and the state of its schedule: the last slot run)
    backup-policy-dept/<dept>       a department's settings (its VMs follow them where their own say nothing)

A VM's effective policy takes each part from the first that states it: the VM's own settings, its
department's, then the defaults. The parts are the schedule (``daily`` at HH:MM, ``weekly`` the day whose
backup is a full one), the retention of the generations kept on the hosts (keep the newest ``keep``, and
the newest of each of the last ``keep_daily`` days, ``keep_weekly`` ISO weeks and ``keep_monthly`` months:
:mod:`kasou.model.retention`) and ``lock_days``: how long the hospital asks generations on the backup server
to be locked. That lock is set and enforced by the backup server alone (``kasou backup-server policy``,
never from a hypervisor); kasou only compares: ``backup status`` reports a VM whose copies are locked for
less than its policy asks, with the backup-server command that fixes it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from kasou.config import backup_keep_setting
from kasou.control.backup_records import check_keep, parse_daily, policy_key
from kasou.control.records import VMRecord
from kasou.errors import InvalidSpec, NotFound
from kasou.model.criticality import CLINICAL_24H
from kasou.model.names import validate_name
from kasou.model.retention import Counts
from kasou.model.timeofday import last_slot

WEEKDAYS = ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday")
KEEP_24H_CLINICAL = 5  # the guideline's example for the medical record system
KEEP_OTHERS = 3  # and for the other systems
RETENTION_FIELDS = ("keep", "keep_daily", "keep_weekly", "keep_monthly")
MAX_LOCK_DAYS = 36500


def department_policy_key(department: str) -> str:
    return f"backup-policy-dept/{department}"


class BackupPolicy(BaseModel):
    """A VM's own settings or a department's; None: not stated here (the next level's, or the default)."""

    daily: str | None = None  # HH:MM, the host's local time
    off: bool = False  # a VM's: no scheduled backups even if its department has a schedule
    weekly: str | None = None  # a weekday: that day's scheduled backup is a full one (the others incremental)
    keep: int | None = None  # the newest N generations
    keep_daily: int | None = None  # and the newest of each of the last N days ...
    keep_weekly: int | None = None  # ... ISO weeks ...
    keep_monthly: int | None = None  # ... and months
    lock_days: int | None = None  # how long the backup server should lock each copy (it decides; kasou checks)
    vm_uuid: str | None = None  # the VM it was set for: a later VM of the name does not inherit it
    set_at: float = Field(default_factory=time.time)  # when the schedule was last set
    last_slot: float | None = None  # a VM's: the latest scheduled slot handled (run, or reported missed)

    def states_retention(self) -> bool:
        return any(getattr(self, f) is not None for f in RETENTION_FIELDS)


class PolicyUpdate(BaseModel):
    """Body of ``PATCH /v1/vms/{name}/backup-policy`` and ``/v1/departments/{department}/backup-policy``:
    omitted fields stay as they are; 0 for a daily, weekly or monthly count or the lock clears it."""

    model_config = ConfigDict(extra="forbid")

    daily: str | None = None  # HH:MM
    off: bool = False  # no schedule (a VM's: even if its department has one)
    weekly: str | None = None  # a weekday, or "" to clear
    keep: int | None = None
    keep_daily: int | None = None
    keep_weekly: int | None = None
    keep_monthly: int | None = None
    lock_days: int | None = None
    reset: bool = False  # forget every setting here first (a VM then follows its department and the defaults)


class Effective(BaseModel):
    daily: str | None
    weekly: str | None
    counts: dict[str, int]  # keep, keep_daily, keep_weekly, keep_monthly (0: not used)
    lock_days: int | None
    set_at: float  # when the schedule it follows was set
    sources: dict[str, str]  # schedule, retention, lock: where each part comes from

    @property
    def retention(self) -> Counts:
        c = self.counts
        return Counts(c["keep"], c["keep_daily"], c["keep_weekly"], c["keep_monthly"])


class PolicyView(BaseModel):
    vm: str | None  # None: a department's own settings
    department: str | None
    criticality: str | None
    daily: str | None
    weekly: str | None
    keep: int  # the newest N kept (0: only the daily, weekly and monthly counts keep)
    keep_is_default: bool  # the retention is the default (no VM or department states one)
    keep_daily: int
    keep_weekly: int
    keep_monthly: int
    lock_days: int | None
    next_run: float | None
    sources: dict[str, str]


# -- pure rules (unit-tested) --------------------------------------------------------------------


def parse_weekday(value: str) -> str:
    v = value.strip().lower()
    match = [d for d in WEEKDAYS if len(v) >= 3 and d.startswith(v)]
    if len(match) != 1:
        raise InvalidSpec(f"--weekly takes a day of the week (monday to sunday), not {value!r}", field="weekly")
    return match[0]


def check_update(upd: PolicyUpdate) -> None:
    """Bad input is refused before anything changes."""
    if upd.daily is not None:
        if upd.off:
            raise InvalidSpec("give either --daily or --off, not both", field="daily")
        parse_daily(upd.daily)
    if upd.weekly:
        parse_weekday(upd.weekly)
    if upd.keep is not None:
        check_keep(upd.keep)
    for f in ("keep_daily", "keep_weekly", "keep_monthly"):
        v = getattr(upd, f)
        if v is not None and not 0 <= v <= 1000:
            raise InvalidSpec(f"--{f.replace('_', '-')} takes 0 to 1000, not {v}", field=f)
    if upd.lock_days is not None and not 0 <= upd.lock_days <= MAX_LOCK_DAYS:
        raise InvalidSpec(f"--lock-days takes 0 to {MAX_LOCK_DAYS}, not {upd.lock_days}", field="lock_days")


def apply_update(p: BackupPolicy, upd: PolicyUpdate, now: float) -> BackupPolicy:
    """``p`` changed as ``upd`` says (checked by :func:`check_update`)."""
    if upd.reset:
        p = BackupPolicy(vm_uuid=p.vm_uuid, set_at=now, last_slot=p.last_slot)
    changes: dict[str, Any] = {}
    if upd.off:
        changes.update(daily=None, off=True)
    elif upd.daily is not None:
        daily = upd.daily.strip()
        changes.update(off=False)
        if daily != p.daily:
            changes.update(daily=daily, set_at=now, last_slot=None)
    if upd.weekly is not None:
        changes["weekly"] = parse_weekday(upd.weekly) if upd.weekly else None
    for f in (*RETENTION_FIELDS, "lock_days"):
        v = getattr(upd, f)
        if v is not None:
            changes[f] = v or None
    return p.model_copy(update=changes)


def default_keep(criticality: str | None) -> tuple[int, str]:
    """Generations kept when no VM or department states a retention, and why."""
    env = backup_keep_setting()
    if env is not None:
        return env, "KASOU_BACKUP_KEEP"
    if criticality == CLINICAL_24H:
        return KEEP_24H_CLINICAL, f"default for criticality {CLINICAL_24H}"
    return KEEP_OTHERS, f"default for criticality {criticality}" if criticality else "default"


def effective(own: BackupPolicy | None, dept: BackupPolicy | None, department: str | None,
              criticality: str | None) -> Effective:  # fmt: skip
    """A VM's policy from its own settings, its department's, and the defaults (each part from the first
    that states it)."""
    d_src = f"department {department}"
    sources: dict[str, str] = {}
    daily = weekly = None
    set_at = 0.0
    if own is not None and own.off:
        sources["schedule"] = "vm (off)"
    elif own is not None and own.daily is not None:
        daily, weekly, set_at, sources["schedule"] = own.daily, own.weekly, own.set_at, "vm"
    elif dept is not None and dept.daily is not None:
        daily, weekly, set_at, sources["schedule"] = dept.daily, dept.weekly, dept.set_at, d_src
    else:
        sources["schedule"] = "none"
    counts = dict.fromkeys(RETENTION_FIELDS, 0)
    src = next((p for p in (own, dept) if p is not None and p.states_retention()), None)
    if src is not None:
        counts.update({f: getattr(src, f) or 0 for f in RETENTION_FIELDS})
        sources["retention"] = "vm" if src is own else d_src
    else:
        counts["keep"], sources["retention"] = default_keep(criticality)
    lock = next((p.lock_days for p in (own, dept) if p is not None and p.lock_days is not None), None)
    sources["lock"] = "none" if lock is None else ("vm" if own is not None and own.lock_days else d_src)
    return Effective(daily=daily, weekly=weekly, counts=counts, lock_days=lock, set_at=set_at, sources=sources)


def full_on(weekly: str | None, slot: float) -> bool:
    """Whether the scheduled backup of ``slot`` is the week's full one."""
    return weekly is not None and WEEKDAYS[datetime.fromtimestamp(slot).weekday()] == weekly


def view(vm: str | None, rec: VMRecord | None, eff: Effective, now: float, department: str | None = None
         ) -> PolicyView:  # fmt: skip
    nxt = last_slot(eff.daily, now) + 86400 if eff.daily is not None else None
    c = eff.counts
    return PolicyView(
        vm=vm, department=rec.department if rec is not None else department,
        criticality=rec.criticality if rec is not None else None, daily=eff.daily, weekly=eff.weekly,
        keep=c["keep"], keep_is_default=eff.sources["retention"].startswith(("default", "KASOU_")),
        keep_daily=c["keep_daily"], keep_weekly=c["keep_weekly"], keep_monthly=c["keep_monthly"],
        lock_days=eff.lock_days, next_run=nxt, sources=eff.sources,
    )  # fmt: skip


# -- over the store ------------------------------------------------------------------------------


class BackupPolicies:
    """The policies in the store: read, set, and resolved per VM."""

    def __init__(self, store: Any, get_vm: Callable[[str], Any], clock: Callable[[], float]) -> None:
        self.store = store
        self.get_vm = get_vm  # async: the VM's record (NotFound if none)
        self.clock = clock

    async def own(self, owner: VMRecord) -> BackupPolicy | None:
        """The VM's own settings (those an earlier VM of the name left are not its)."""
        e = await self.store.get(policy_key(owner.name))
        p = BackupPolicy.model_validate(e.value) if e is not None else None
        if p is None or p.vm_uuid not in (None, owner.uuid):
            return None
        return p

    async def department(self, department: str | None) -> BackupPolicy | None:
        if not department:
            return None
        e = await self.store.get(department_policy_key(department))
        return BackupPolicy.model_validate(e.value) if e is not None else None

    async def effective(self, owner: VMRecord) -> Effective:
        own, dept = await self.own(owner), await self.department(owner.department)
        return effective(own, dept, owner.department, owner.criticality)

    async def get(self, vm: str) -> PolicyView:
        rec = await self.get_vm(vm)
        return view(vm, rec, await self.effective(rec), self.clock())

    async def set(self, vm: str, upd: PolicyUpdate) -> PolicyView:
        check_update(upd)
        owner = await self.get_vm(vm)
        p = await self.own(owner) or BackupPolicy(set_at=self.clock())
        p = apply_update(p, upd, self.clock()).model_copy(update={"vm_uuid": owner.uuid})
        await self.store.put(policy_key(vm), p.model_dump(mode="json"))
        return await self.get(vm)

    async def get_department(self, department: str) -> PolicyView:
        validate_name(department, "department")
        p = await self.department(department)
        if p is None:
            raise NotFound(f"department {department!r} has no backup policy of its own")
        return view(None, None, effective(None, p, department, None), self.clock(), department)

    async def set_department(self, department: str, upd: PolicyUpdate) -> PolicyView:
        validate_name(department, "department")
        check_update(upd)
        p = await self.department(department) or BackupPolicy(set_at=self.clock())
        p = apply_update(p, upd, self.clock()).model_copy(update={"off": False})
        await self.store.put(department_policy_key(department), p.model_dump(mode="json"))
        return await self.get_department(department)

    async def departments(self) -> list[str]:
        return [e.key.removeprefix("backup-policy-dept/") for e in await self.store.range("backup-policy-dept/")]
