from __future__ import annotations

from kasou.control.records import LedgerEntry, LedgerEvent
from kasou.control.report import uptime_row


def ev(t: float, e: LedgerEvent) -> LedgerEntry:
    return LedgerEntry(time=t, event=e, host="h1")


def test_migration_is_not_a_stop() -> None:
    row = uptime_row(
        "emr",
        [
            ev(0, LedgerEvent.DEFINED),
            ev(10, LedgerEvent.STARTED),
            ev(20, LedgerEvent.MIGRATED),
            ev(30, LedgerEvent.MIGRATED),
        ],
        now=100,
    )
    assert row.running and row.running_since == 10 and row.uptime_s == 90
    assert row.stops == 0 and row.migrations == 2


def test_stops_and_crashes_reset_the_run() -> None:
    events = [
        ev(10, LedgerEvent.STARTED), ev(20, LedgerEvent.CRASHED), ev(25, LedgerEvent.RESTARTED),
        ev(40, LedgerEvent.STOPPED), ev(50, LedgerEvent.STARTED), ev(55, LedgerEvent.PAUSED), ev(56, LedgerEvent.RESUMED),
    ]  # fmt: skip
    row = uptime_row("lab", events, now=60)
    assert row.stops == 2 and row.crashes == 1
    assert row.running_since == 50 and row.uptime_s == 10
    stopped = uptime_row("lab", events[:4], now=60)
    assert not stopped.running and stopped.uptime_s is None
