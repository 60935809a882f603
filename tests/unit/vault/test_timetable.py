"""The backup server's timetable: what is due when, and a failed task reported while the others run."""

from __future__ import annotations

from datetime import datetime

import pytest

from kasou.errors import InvalidSpec, KasouError
from kasou.vault import timetable as vt
from kasou.vault.store import Store


def at(h: int, m: int = 0, day: int = 7) -> float:
    return datetime(2026, 12, day, h, m).timestamp()


def test_what_is_due() -> None:
    t = vt.Timetable(sync_from="https://a:8472", sync_token="t", sync_every_min=60, prune_at="03:00")
    s = vt.TimetableState()
    assert vt.due(t, s, at(2), since=at(1)) == ["sync"]  # prune's 03:00 slot has not come; yesterday's predates
    assert vt.due(t, vt.TimetableState(last_sync=at(1, 30)), at(2), since=at(1)) == []
    assert vt.due(t, vt.TimetableState(last_sync=at(2, 30)), at(3, 1), since=at(1)) == ["prune"]
    done = vt.TimetableState(last_sync=at(2, 30), last_prune_slot=at(3, 1))
    assert vt.due(t, done, at(3, 20), since=at(1)) == []  # once per day
    assert vt.due(t, done, at(3, 1, day=8), since=at(1)) == ["sync", "prune"]


def test_bad_timetables_are_refused() -> None:
    for bad in (vt.Timetable(sync_every_min=60), vt.Timetable(prune_at="3am"),
                vt.Timetable(sync_from="x", sync_token="t", sync_every_min=0), vt.Timetable(verify_days=0)):  # fmt: skip
        with pytest.raises(InvalidSpec):
            bad.check()


def test_a_failed_task_is_reported_and_the_others_run(store: Store) -> None:
    now = [at(5)]
    store.clock = lambda: now[0]  # type: ignore[method-assign]
    vt.save(store, vt.Timetable(sync_from="https://a:8472", sync_token="t", sync_every_min=30, verify_at="04:00"))
    ran: list[str] = []

    def broken(_s: Store, _t: vt.Timetable) -> str:
        raise KasouError("the primary did not answer")

    def fine(_s: Store, _t: vt.Timetable) -> str:
        ran.append("verify")
        return "0 generation(s) verified sound"

    assert vt.run_due(store, since=at(1), runners={"sync": broken, "verify": fine}) == ["sync", "verify"]
    st = vt.load_state(store)
    assert st.results["sync"]["ok"] is False and "did not answer" in st.results["sync"]["summary"]
    assert st.results["verify"]["ok"] and ran == ["verify"]
    assert [e["event"] for e in store.events()][-2:] == ["scheduled_sync", "scheduled_verify"]
    assert vt.run_due(store, since=at(1), runners={"sync": broken, "verify": fine}) == []  # not again this soon
    store.set_isolated(True)
    now[0] += 3600
    assert vt.run_due(store, since=at(1), runners={"sync": broken, "verify": fine}) == []  # isolated: no sync
