"""Which generations a retention keeps: a pure function shared by the backup server's prune
(:mod:`kasou.vault.policy`) and the control plane's local generations (:mod:`kasou.control.backups`).

As Proxmox Backup Server's prune: keep the newest ``keep_last``; then for daily, weekly and monthly, go from
the newest down and keep the newest generation of each period not already covered by a kept one, until N
periods are kept. A generation still locked is kept whatever the selection says. With every count 0 all
are kept.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Held:
    """What the selection needs of a generation: its number, when it was taken (or received), its lock."""

    generation: int
    received: float
    locked_until: float | None = None


@dataclass
class Decision:
    generation: int
    keep: bool
    reasons: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Counts:
    keep_last: int = 0
    keep_daily: int = 0
    keep_weekly: int = 0
    keep_monthly: int = 0

    @property
    def keeps_all(self) -> bool:
        return not (self.keep_last or self.keep_daily or self.keep_weekly or self.keep_monthly)


def periods(tz: dt.tzinfo | None) -> list[tuple[str, str, Callable[[float], object]]]:
    """(count's name, label, the period a time falls in) for days, ISO weeks and months in ``tz``."""

    def day(t: float) -> object:
        return dt.datetime.fromtimestamp(t, tz).date()

    def week(t: float) -> object:
        return dt.datetime.fromtimestamp(t, tz).isocalendar()[:2]

    def month(t: float) -> object:
        d = dt.datetime.fromtimestamp(t, tz)
        return (d.year, d.month)

    return [("keep_daily", "daily", day), ("keep_weekly", "weekly", week), ("keep_monthly", "monthly", month)]


def select(held: Iterable[Held], counts: Counts, now: float, tz: dt.tzinfo | None = None) -> list[Decision]:
    """Which of one VM's generations a prune keeps (see the module's doc). Newest first."""
    gens = sorted(held, key=lambda h: (h.received, h.generation), reverse=True)
    marks: dict[int, Decision] = {}
    keep_all = counts.keeps_all
    for h in gens[: counts.keep_last]:
        marks[h.generation] = Decision(h.generation, True, ["last"])
    for attr, label, period in periods(tz):
        keep = getattr(counts, attr)
        if keep_all or keep == 0:
            continue
        covered = {period(h.received) for h in gens if h.generation in marks and marks[h.generation].keep}
        chosen: set[object] = set()
        for h in gens:
            if h.generation in marks:
                continue
            p = period(h.received)
            if p in covered:
                continue
            if p not in chosen:
                if len(chosen) >= keep:
                    break
                chosen.add(p)
                marks[h.generation] = Decision(h.generation, True, [label])
            else:
                marks[h.generation] = Decision(h.generation, False)
    out = []
    for h in gens:
        d = marks.get(h.generation) or Decision(h.generation, keep_all, ["keep-all"] if keep_all else [])
        if h.locked_until is not None and h.locked_until > now:
            d.keep = True
            d.reasons.append("locked")
        out.append(d)
    return out
