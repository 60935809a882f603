"""Backup policy in a hospital's words: which level each part comes from, the criticality defaults, updates."""

from __future__ import annotations

from datetime import datetime

import pytest

from kasou.control.backup_policy import (
    BackupPolicy,
    PolicyUpdate,
    apply_update,
    check_update,
    effective,
    full_on,
    parse_weekday,
)
from kasou.errors import InvalidSpec
from kasou.model.retention import Counts, Held, select


def test_defaults_follow_the_criticality(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KASOU_BACKUP_KEEP", raising=False)
    e = effective(None, None, None, "24h-clinical")
    assert (e.counts["keep"], e.daily, e.lock_days) == (5, None, None)
    assert e.sources == {"schedule": "none", "retention": "default for criticality 24h-clinical", "lock": "none"}
    assert effective(None, None, None, "batch").counts["keep"] == 3
    assert effective(None, None, None, None).counts["keep"] == 3
    monkeypatch.setenv("KASOU_BACKUP_KEEP", "9")
    assert effective(None, None, None, "24h-clinical").counts["keep"] == 9


def test_each_part_comes_from_the_first_level_that_states_it() -> None:
    dept = BackupPolicy(daily="02:00", weekly="sunday", keep_daily=5, keep_weekly=4, lock_days=30, set_at=1.0)
    own = BackupPolicy(keep=7, set_at=2.0)
    e = effective(own, dept, "emr", "24h-clinical")
    assert (e.daily, e.weekly, e.lock_days, e.set_at) == ("02:00", "sunday", 30, 1.0)
    assert e.counts == {"keep": 7, "keep_daily": 0, "keep_weekly": 0, "keep_monthly": 0}
    assert e.sources == {"schedule": "department emr", "retention": "vm", "lock": "department emr"}
    off = effective(BackupPolicy(off=True), dept, "emr", None)
    assert off.daily is None and off.sources["schedule"] == "vm (off)"
    own_daily = effective(BackupPolicy(daily="23:00", set_at=5.0), dept, "emr", None)
    assert (own_daily.daily, own_daily.weekly, own_daily.set_at) == ("23:00", None, 5.0)
    assert own_daily.retention == Counts(0, 5, 4, 0)


def test_updates_are_checked_and_applied() -> None:
    for bad in (PolicyUpdate(daily="25:00"), PolicyUpdate(daily="02:00", off=True), PolicyUpdate(weekly="funday"),
                PolicyUpdate(keep=0), PolicyUpdate(keep_daily=-1), PolicyUpdate(lock_days=40000)):  # fmt: skip
        with pytest.raises(InvalidSpec):
            check_update(bad)
    p = apply_update(BackupPolicy(set_at=0.0), PolicyUpdate(daily="02:00", weekly="sun", keep_daily=5), 10.0)
    assert (p.daily, p.weekly, p.keep_daily, p.set_at) == ("02:00", "sunday", 5, 10.0)
    p = apply_update(p, PolicyUpdate(keep_daily=0, lock_days=60), 20.0)
    assert (p.keep_daily, p.lock_days, p.set_at) == (None, 60, 10.0)  # 0 clears; the schedule is unchanged
    p = apply_update(p, PolicyUpdate(off=True), 30.0)
    assert (p.daily, p.off) == (None, True)
    assert apply_update(p, PolicyUpdate(reset=True), 40.0).model_dump(exclude={"set_at"}) == BackupPolicy(
        last_slot=None).model_dump(exclude={"set_at"})  # fmt: skip


def test_weekdays_and_the_weekly_full() -> None:
    assert parse_weekday("Sun") == "sunday" and parse_weekday("monday") == "monday"
    with pytest.raises(InvalidSpec):
        parse_weekday("t")  # tuesday or thursday
    sunday = datetime(2026, 12, 6, 2, 0).timestamp()
    assert full_on("sunday", sunday) and not full_on("monday", sunday) and not full_on(None, sunday)


def test_keep_last_joins_the_daily_selection() -> None:
    day = 86400.0
    held = [Held(g, g * day / 2) for g in range(1, 11)]  # two a day for five days
    kept = {d.generation for d in select(held, Counts(keep_last=1, keep_daily=3), now=20 * day) if d.keep}
    assert kept == {10, 9, 7, 5}  # the newest (day 5), then the newest of three more days
    kept = {d.generation for d in select(held, Counts(keep_last=3), now=20 * day) if d.keep}
    assert kept == {10, 9, 8}
