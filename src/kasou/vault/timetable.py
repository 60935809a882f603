"""The backup server's own timetable, run by ``kasou backup-server serve``: pull from a primary (a second
site's sync) every N minutes, apply the retention policy (prune, then garbage collection) and verify the
generations not verified within a number of days, each daily at a time of day (the server's local time).

Set on the backup server's command line alone (``kasou backup-server timetable set``), as its policy is:
nothing of it is reachable from a hypervisor. ``timetable.json`` holds the settings (with the primary's
reader token, so it is the server's own 0600 file), ``timetable-state.json`` what ran last and how it
went; every run and every failure is an event in ``events.jsonl``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from kasou.errors import InvalidSpec, KasouError
from kasou.model.timeofday import due_slot, parse_hhmm
from kasou.vault import policy
from kasou.vault.store import Store, read_json, write_json

TICK_S = 20.0  # how often serve looks at the timetable


@dataclass(frozen=True)
class Timetable:
    sync_from: str | None = None  # the primary's URL
    sync_token: str | None = None  # a reader token of the primary
    sync_fingerprint: str | None = None  # its certificate's SHA-256
    sync_every_min: int | None = None  # pull this often
    prune_at: str | None = None  # HH:MM: prune (the policy's retention), then gc
    verify_at: str | None = None  # HH:MM: verify what was not verified within verify_days
    verify_days: int = 7

    def check(self) -> Timetable:
        if self.sync_every_min is not None:
            if not 1 <= self.sync_every_min <= 10080:
                raise InvalidSpec("--sync-every takes 1 to 10080 minutes", field="sync_every")
            if not (self.sync_from and self.sync_token):
                raise InvalidSpec("a scheduled sync needs --from URL and --token (a reader token of the primary)",
                                  field="sync_from")  # fmt: skip
        for name in ("prune_at", "verify_at"):
            v = getattr(self, name)
            if v is not None:
                parse_hhmm(v, f"--{name.replace('_', '-')}", name)
        if not 1 <= self.verify_days <= 3650:
            raise InvalidSpec("--verify-days takes 1 to 3650", field="verify_days")
        return self

    def public(self) -> dict[str, Any]:
        """What ``timetable show`` prints (the token only as set or not)."""
        d = asdict(self)
        d["sync_token"] = "(set)" if self.sync_token else None
        return d


@dataclass
class TimetableState:
    last_sync: float | None = None
    last_prune_slot: float | None = None
    last_verify_slot: float | None = None
    results: dict[str, Any] = field(default_factory=dict)  # task: {at, ok, summary}


def load(store: Store) -> Timetable:
    path = store.root / "timetable.json"
    return Timetable(**read_json(path)) if path.exists() else Timetable()


def save(store: Store, t: Timetable) -> None:
    write_json(store.root / "timetable.json", asdict(t.check()))
    store.event("timetable_set", **t.public())


def load_state(store: Store) -> TimetableState:
    path = store.root / "timetable-state.json"
    return TimetableState(**read_json(path)) if path.exists() else TimetableState()


def due(t: Timetable, s: TimetableState, now: float, since: float) -> list[str]:
    """The tasks to run now (pure: unit-tested). ``since``: when the timetable was set or serve started, so
    a daily slot from before it does not run on first sight."""
    out = []
    if t.sync_every_min and t.sync_from and (s.last_sync is None or now - s.last_sync >= t.sync_every_min * 60):
        out.append("sync")
    for task, at, last in (("prune", t.prune_at, s.last_prune_slot), ("verify", t.verify_at, s.last_verify_slot)):
        if at is None:
            continue
        if due_slot(at, now, since, last) is not None:
            out.append(task)
    return out


Runner = Callable[[Store, Timetable], str]


def _sync(store: Store, t: Timetable) -> str:
    from kasou.vault.sync import Primary, sync

    assert t.sync_from is not None and t.sync_token is not None
    primary = Primary(t.sync_from, t.sync_token, t.sync_fingerprint)
    try:
        r = sync(store, primary)
    finally:
        primary.close()
    if r.failed:
        raise KasouError(f"{len(r.failed)} generation(s) not copied: {r.failed[0][2]}")
    return f"{len(r.added)} generation(s) copied, {r.chunks} chunk(s)"


def _prune(store: Store, _t: Timetable) -> str:
    decisions = policy.prune(store)
    removed = sum(1 for ds in decisions.values() for d in ds if not d.keep)
    g = policy.gc(store)
    return f"{removed} generation(s) pruned, {g.removed} chunk(s) removed"


def _verify(store: Store, t: Timetable) -> str:
    results = policy.verify(store, since_days=t.verify_days)
    damaged = [r for r in results if r.damaged]
    if damaged:
        raise KasouError(f"{len(damaged)} of {len(results)} generation(s) damaged, e.g. {damaged[0].vm} "
                         f"generation {damaged[0].generation}")  # fmt: skip
    return f"{len(results)} generation(s) verified sound"


RUNNERS: dict[str, Runner] = {"sync": _sync, "prune": _prune, "verify": _verify}


def run_due(store: Store, since: float, runners: dict[str, Runner] | None = None) -> list[str]:
    """Run what is due, one task after the other; a failure is an event and the state's result, and the
    others still run. Returns the tasks run."""
    t, s = load(store), load_state(store)
    now = store.clock()
    tasks = due(t, s, now, since)
    if store.isolated and "sync" in tasks:  # cut off: this server reaches no other either
        tasks.remove("sync")
    for task in tasks:
        run = (runners or RUNNERS)[task]
        try:
            summary, ok = run(store, t), True
        except Exception as e:
            summary, ok = (e.message if isinstance(e, KasouError) else f"{type(e).__name__}: {e}"), False
        store.event(f"scheduled_{task}", ok=ok, summary=summary)
        s = load_state(store)
        if task == "sync":
            s = replace(s, last_sync=now)
        elif task == "prune":
            s = replace(s, last_prune_slot=now)
        else:
            s = replace(s, last_verify_slot=now)
        s.results[task] = {"at": now, "ok": ok, "summary": summary}
        write_json(store.root / "timetable-state.json", asdict(s))
    return tasks
