"""Reports from the uptime ledger: how long each VM has run since its last real stop.

A migration is not a stop: the guest never noticed it. A stop is a ``stopped``
or ``crashed`` event; the VM's current run began at the first ``started`` or
``restarted`` after the last stop.
"""

from __future__ import annotations

import time

from pydantic import BaseModel

from kasou.control.records import LedgerEntry, LedgerEvent

_STOPS = (LedgerEvent.STOPPED, LedgerEvent.CRASHED)
_STARTS = (LedgerEvent.STARTED, LedgerEvent.RESTARTED)


class UptimeRow(BaseModel):
    name: str
    running: bool
    running_since: float | None  # epoch seconds of the start of the current run
    uptime_s: float | None  # since the last real stop (None if not running)
    stops: int  # stopped + crashed events
    crashes: int
    migrations: int


def uptime_row(name: str, events: list[LedgerEntry], now: float | None = None) -> UptimeRow:
    now = time.time() if now is None else now
    since: float | None = None
    stops = crashes = migrations = 0
    for e in events:
        if e.event in _STOPS:
            stops += 1
            crashes += e.event == LedgerEvent.CRASHED
            since = None
        elif e.event in _STARTS and since is None:
            since = e.time
        elif e.event == LedgerEvent.MIGRATED:
            migrations += 1
    return UptimeRow(
        name=name,
        running=since is not None,
        running_since=since,
        uptime_s=None if since is None else round(now - since, 1),
        stops=stops,
        crashes=crashes,
        migrations=migrations,
    )
