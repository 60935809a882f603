"""``kasou backup status``: per VM, is there a recent good backup, and is it on the backup server?

A VM is ``ok`` when its newest generation is recent enough for its schedule (a day and the schedule's grace
for a daily one) and, when the site has a backup server, that generation was copied there. Otherwise it is
``late`` (the schedule's slot passed with no generation), ``not_copied`` (the newest generation is only on its
host) or ``never`` (no generation at all). ``--check`` fails on anything but ``ok`` (for monitoring).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel

from kasou.model.state import VMState

if TYPE_CHECKING:
    from kasou.control.backups import Backups

DAY_S = 86_400.0
State = Literal["ok", "late", "not_copied", "never"]


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
        out.append(BackupStatus(
            vm=rec.name, state=state, reason=reason, schedule=policy.daily,
            last_generation=last.generation if last else None, last_at=last.created_at if last else None,
            age_s=round(now - last.created_at, 1) if last else None,
            offsite_generation=newest_copy.generation if newest_copy else None,
            locked_until=newest_copy.locked_until if newest_copy else None,
            drill_at=drills[rec.name].at if rec.name in drills else None,
            drill_ok=drills[rec.name].ok if rec.name in drills else None,
        ))  # fmt: skip
    return out
