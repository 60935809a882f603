"""Which generations a prune keeps (a pure function, a fake clock) and the policy file."""

from __future__ import annotations

import datetime as dt

import pytest

from kasou.errors import InvalidSpec
from kasou.vault.policy import Held, Policy, Retention, load_policy, select, set_policy
from kasou.vault.store import Store

UTC = dt.UTC


def at(y: int, m: int, d: int, h: int = 12) -> float:
    return dt.datetime(y, m, d, h, tzinfo=UTC).timestamp()


def kept(decisions: list, by: dict[int, float]) -> list[str]:
    return sorted(dt.datetime.fromtimestamp(by[d.generation], UTC).strftime("%Y-%m-%d %H") for d in decisions if d.keep)


def test_the_defaults_are_the_mhlw_example() -> None:
    r = Retention()
    assert (r.keep_daily, r.keep_weekly, r.keep_monthly, r.lock_days) == (5, 4, 12, 30)


def test_the_newest_of_a_day_is_kept() -> None:
    times = {1: at(2026, 3, 1, 10), 2: at(2026, 3, 1, 14), 3: at(2026, 3, 2, 9)}
    d = select([Held(g, t) for g, t in times.items()], Retention(5, 0, 0, 0), now=at(2026, 3, 3), tz=UTC)
    assert [x.generation for x in d] == [3, 2, 1]  # newest first
    assert kept(d, times) == ["2026-03-01 14", "2026-03-02 09"]


def test_only_n_days_are_kept() -> None:
    times = {g: at(2026, 3, g) for g in range(1, 5)}
    d = select([Held(g, t) for g, t in times.items()], Retention(2, 0, 0, 0), now=at(2026, 3, 5), tz=UTC)
    assert kept(d, times) == ["2026-03-03 12", "2026-03-04 12"]


def test_a_locked_generation_is_never_removed() -> None:
    now = at(2026, 3, 10)
    held = [Held(1, at(2026, 3, 1), locked_until=now + 1), Held(2, at(2026, 3, 2)), Held(3, at(2026, 3, 3))]
    d = {x.generation: x for x in select(held, Retention(1, 0, 0, 0), now=now, tz=UTC)}
    assert d[3].keep and d[3].reasons == ["daily"]
    assert d[1].keep and d[1].reasons == ["locked"]
    assert not d[2].keep
    # once the lock has passed it goes
    d = {x.generation: x for x in select(held, Retention(1, 0, 0, 0), now=now + 2, tz=UTC)}
    assert not d[1].keep


def test_weekly_keeps_the_newest_of_each_iso_week() -> None:
    times = {g: at(2026, 3, 2) + (g - 1) * 86400 for g in range(1, 22)}  # Mon 2 March .. Sun 22 March
    d = select([Held(g, t) for g, t in times.items()], Retention(0, 2, 0, 0), now=at(2026, 3, 23), tz=UTC)
    assert kept(d, times) == ["2026-03-15 12", "2026-03-22 12"]  # the Sundays of ISO weeks 11 and 12


def test_daily_weekly_and_monthly_together_as_pbs_does() -> None:
    end = dt.date(2026, 3, 29)  # a Sunday
    times = {i: at(*(end - dt.timedelta(days=400 - i)).timetuple()[:3]) for i in range(401)}
    d = select([Held(g, t) for g, t in times.items()], Retention(5, 4, 12, 30), now=at(2026, 3, 30), tz=UTC)
    days = [s[:10] for s in kept(d, times)]
    daily = ["2026-03-25", "2026-03-26", "2026-03-27", "2026-03-28", "2026-03-29"]
    weekly = ["2026-03-01", "2026-03-08", "2026-03-15", "2026-03-22"]  # ISO week 13 is covered by the daily ones
    monthly = ["2025-03-31", "2025-04-30", "2025-05-31", "2025-06-30", "2025-07-31", "2025-08-31", "2025-09-30",
               "2025-10-31", "2025-11-30", "2025-12-31", "2026-01-31", "2026-02-22"]  # fmt: skip
    # February's newest is 22 Feb: 23-28 Feb are in ISO week 9, whose newest (1 March) the weekly pass kept, so
    # it marked them removed before the monthly pass (as PBS's prune does)
    assert days == sorted(daily + weekly + monthly)


def test_no_keep_counts_keep_everything() -> None:
    d = select([Held(g, at(2026, 3, g)) for g in range(1, 4)], Retention(0, 0, 0, 0), now=at(2026, 4, 1), tz=UTC)
    assert all(x.keep for x in d)


def test_bad_settings_are_refused() -> None:
    with pytest.raises(InvalidSpec, match="keep-daily"):
        Retention(keep_daily=-1)
    with pytest.raises(InvalidSpec, match="lock-days"):
        Retention(lock_days=10**9)
    with pytest.raises(InvalidSpec, match="unknown policy setting"):
        Policy.from_dict({"default": {"keep_yearly": 3}})


def test_a_vm_policy_starts_from_the_default_and_can_be_reset(store: Store) -> None:
    set_policy(store, keep_daily=7)
    p = set_policy(store, "emr-db", lock_days=90)
    assert p.for_vm("emr-db") == Retention(7, 4, 12, 90)
    assert load_policy(store).for_vm("other") == Retention(7, 4, 12, 30)
    assert load_policy(store).for_vm("emr-db").lock_days == 90
    set_policy(store, "emr-db", reset=True)
    assert load_policy(store).for_vm("emr-db") == Retention(7, 4, 12, 30)
    assert [e["event"] for e in store.events()][-3:] == ["policy_set"] * 3
    with pytest.raises(InvalidSpec):
        set_policy(store, "../x", lock_days=1)
