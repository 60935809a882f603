"""``kasou backup status``: per VM, is there a recent good backup, and is it on the backup server?

A VM is ``ok`` when its newest generation is recent enough for its schedule (a day and the schedule's grace
for a daily one) and, when the site has a backup server, that generation was copied there. Otherwise it is
``late`` (the schedule's slot passed with no generation), ``not_copied`` (the newest generation is only on its
host), ``never`` (no generation at all), ``damaged`` (the backup server's verification found the newest copy
damaged), ``lock_short`` (the backup server locks the copy for less than the VM's policy asks: the lock is
the backup server's to set) or ``unknown`` (the backup server could not be asked: what it holds is not
known). ``--check`` fails on anything but ``ok`` (for monitoring).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, Literal, Protocol

from pydantic import BaseModel, Field

from kasou.control.drill import DrillResult
from kasou.model.state import VMState

if TYPE_CHECKING:
    from kasou.control.backup_policy import PolicyView
    from kasou.control.backup_records import BackupView
    from kasou.control.base import VMControl
    from kasou.control.drill import Drills
    from kasou.control.offsite import Offsite


class Backups(Protocol):
    """What the status and the watch read of :class:`kasou.control.backups.Backups` (which calls them)."""

    vms: VMControl
    offsite: Offsite
    drills: Drills
    grace_s: float

    @property
    def store(self) -> Any: ...

    async def list(self, vm: str) -> list[BackupView]: ...

    async def get_policy(self, vm: str) -> PolicyView: ...


DAY_S = 86_400.0
State = Literal["ok", "late", "not_copied", "never", "damaged", "lock_short", "unknown"]
LOCK_SLACK_S = 3600.0  # a lock this much shorter than asked still counts (clocks, the time a copy takes)


class BackupStatus(BaseModel):
    vm: str
    state: State
    reason: str
    schedule: str | None  # HH:MM daily, or None
    last_generation: int | None
    last_at: float | None
    age_s: float | None
    offsite_generation: int | None  # the newest generation the backup server holds a copy of (from this site)
    locked_until: float | None
    drill_at: float | None = None  # its latest restore drill (kasou backup drill)
    drill_ok: bool | None = None
    verified_at: float | None = None  # the backup server last re-read the newest copy's chunks (sound)
    copied_to: list[dict[str, Any]] = Field(default_factory=list)  # second sites holding the newest copy
    lock_days: int | None = None  # what its policy asks of the backup server's lock
    drill: DrillResult | None = None  # that drill as recorded: generation, restore and boot seconds, check, error


def judge_copy(copy: dict[str, Any] | None, lock_days: int | None, vm: str) -> tuple[State, str] | None:
    """What the backup server's state of the newest copy says against the policy (pure: unit-tested);
    None: nothing to say."""
    if copy is None:
        return None
    if copy.get("damaged"):
        return "damaged", (f"the backup server found {len(copy['damaged'])} damaged chunk(s) in generation "
                           f"{copy.get('generation')} (kasou backup-server verify); back it up again")  # fmt: skip
    held = (copy.get("locked_until") or 0.0) - float(copy.get("received") or 0.0)
    if lock_days and held < lock_days * DAY_S - LOCK_SLACK_S:
        return "lock_short", (f"its copies are locked {max(held, 0) / DAY_S:.0f} days on the backup server; its "
                              f"policy asks {lock_days}: on the backup server, kasou backup-server policy set "
                              f"--vm {vm} --lock-days {lock_days}")  # fmt: skip
    return None


def judge(
    schedule: str | None, last_at: float | None, copied: bool, server_set: bool, grace_s: float, now: float
) -> tuple[State, str]:
    """The state of one VM's backups (pure: unit-tested)."""
    if last_at is None:
        return "never", "no backup generation yet" + ("" if schedule else "; no schedule either")
    age = now - last_at
    if schedule is not None and age > DAY_S + grace_s:
        return "late", f"the newest generation is {age / 3600:.0f} h old; its schedule is daily at {schedule}"
    if server_set and not copied:
        return "not_copied", "the newest generation is only on its host, not on the backup server"
    return "ok", ""


async def status(backups: Backups, now: float | None = None) -> list[BackupStatus]:
    now = time.time() if now is None else now
    server_set = await backups.offsite.get() is not None
    listed, server_error = await backups.offsite.held()
    held = {(str(g["vm"]), int(g["generation"])): g for g in listed}
    drills = {d.vm: d for d in await backups.drills.last()}
    out = []
    for rec in sorted(await backups.vms.records.all(), key=lambda r: r.name):
        if rec.state in (VMState.TEMPLATE, VMState.CREATING):
            continue
        gens = await backups.list(rec.name)
        policy = await backups.get_policy(rec.name)
        last = gens[-1] if gens else None
        copied = [g for g in gens if g.offsite is not None]
        newest_copy = copied[-1].offsite if copied else None
        state, reason = judge(policy.daily, last.created_at if last else None, bool(last and last.offsite),
                              server_set, backups.grace_s, now)  # fmt: skip
        on_server = held.get((rec.name, newest_copy.generation)) if newest_copy is not None else None
        if state == "ok" and server_error is not None and newest_copy is not None:
            state, reason = "unknown", server_error
        elif state == "ok" and (copy_says := judge_copy(on_server, policy.lock_days, rec.name)) is not None:
            state, reason = copy_says
        out.append(BackupStatus(
            vm=rec.name, state=state, reason=reason, schedule=policy.daily,
            last_generation=last.generation if last else None, last_at=last.created_at if last else None,
            age_s=round(now - last.created_at, 1) if last else None,
            offsite_generation=newest_copy.generation if newest_copy else None,
            locked_until=(on_server or {}).get("locked_until") or (newest_copy.locked_until if newest_copy else None),
            verified_at=(on_server or {}).get("verified_at"), lock_days=policy.lock_days,
            copied_to=[c for c in (on_server or {}).get("copied_to") or [] if isinstance(c, dict)],
            drill_at=drills[rec.name].at if rec.name in drills else None,
            drill_ok=drills[rec.name].ok if rec.name in drills else None,
            drill=drills.get(rec.name),
        ))  # fmt: skip
    return out


# -- the watch: what an operator must act on is an event -----------------------------------------

WATCH_EVERY_S = 3600.0
WATCH_FIRST_S = 300.0  # the first look, after the control plane starts
WATCH_KEY = "backup-watch"
# The states the watch raises (late and missed backups, and failed copies, are events when they happen).
RAISED: dict[str, tuple[str, Literal["warning", "error"]]] = {
    "damaged": ("backup_damaged", "error"),
    "lock_short": ("backup_lock_short", "warning"),
}


async def watch(backups: Backups) -> list[str]:
    """Look at every VM's backups as ``backup status`` does and raise an event for each VM that has newly
    come into a state an operator must act on (its copy damaged, locked too short), and once for the site
    when the backup server cannot be asked. What was raised is kept (``backup-watch``), so each is said once
    until it clears. Returns the events' kinds (for tests)."""
    rows = await status(backups)
    e = await backups.store.get(WATCH_KEY)
    seen: dict[str, str] = dict(e.value) if e is not None else {}
    now_seen: dict[str, str] = {}
    raised = []
    unknown = [r for r in rows if r.state == "unknown"]
    if unknown:
        now_seen["(server)"] = "unknown"
        if seen.get("(server)") != "unknown":
            await backups.vms.events.emit("backup_server_unreachable", "backup-server", unknown[0].reason, "error")
            raised.append("backup_server_unreachable")
    for r in rows:
        if r.state not in RAISED:
            continue
        now_seen[r.vm] = r.state
        if seen.get(r.vm) != r.state:
            kind, severity = RAISED[r.state]
            await backups.vms.events.emit(kind, f"vm/{r.vm}", f"backups of VM {r.vm}: {r.reason}", severity)
            raised.append(kind)
    if now_seen != seen:
        await backups.store.put(WATCH_KEY, now_seen)
    return raised
