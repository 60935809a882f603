"""A time of day as ``HH:MM`` (a daily schedule's slot): parsed, and the latest slot not after a moment. Shared
by the control plane's backup schedules (:mod:`kasou.control.backup_policy`) and the backup server's timetable
(:mod:`kasou.vault.timetable`)."""

from __future__ import annotations

import re
from datetime import datetime, timedelta

from kasou.errors import InvalidSpec

_HHMM = re.compile(r"^([01][0-9]|2[0-3]):([0-5][0-9])$")


def parse_hhmm(value: str, option: str, field: str) -> tuple[int, int]:
    """``(hour, minute)``, or InvalidSpec naming the command-line ``option`` and the API ``field``."""
    m = _HHMM.fullmatch(value.strip())
    if m is None:
        raise InvalidSpec(f"{option} takes a time of day as HH:MM (00:00 to 23:59), not {value!r}", field=field)
    return int(m.group(1)), int(m.group(2))


def last_slot(hhmm: str, now: float) -> float:
    """The latest moment at ``hhmm`` (local time) that is not after ``now``."""
    h, m = parse_hhmm(hhmm, "a daily time", "time")
    at = datetime.fromtimestamp(now)
    slot = at.replace(hour=h, minute=m, second=0, microsecond=0)
    if slot > at:
        slot -= timedelta(days=1)
    return slot.timestamp()


def due_slot(hhmm: str, now: float, since: float, last: float | None) -> float | None:
    """The slot to run now: the latest at ``hhmm`` not after ``now``, if it is after ``since`` (when the
    schedule was set, so a slot from before it does not run on first sight) and after ``last`` (the latest one
    handled); else None."""
    slot = last_slot(hhmm, now)
    if slot <= since or (last is not None and last >= slot):
        return None
    return slot
