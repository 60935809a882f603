"""Events: what an operator must hear of without asking (a degraded disk, a pool running out of space,
a backup that failed or did not run, and, critical, a host down or a VM it left without a restart).

Each event is kept in the store under ``events/<time in ns>`` (so the list is in order) and written
to the log. Repeated conditions are raised once: :meth:`Events.raise_once` keeps a key per condition
until :meth:`Events.clear` says it is over, so a pool that stays full does not flood the list.

Whoever must hear of every event recorded in a store (the notifier, :mod:`kasou.control.notify`) subscribes
to it with :func:`subscribe`: each listener is called with the event once it is recorded, and must only
hand it on (put it on a queue): a listener that raises is logged and never fails the emit.
"""

from __future__ import annotations

import logging
import time
import weakref
from collections.abc import Callable
from typing import Literal

from pydantic import BaseModel

from kasou.store.base import Store

log = logging.getLogger(__name__)

Severity = Literal["info", "warning", "error", "critical"]
SEVERITIES: tuple[Severity, ...] = ("info", "warning", "error", "critical")  # in rising order
EVENTS_PREFIX = "events/"
ACTIVE_PREFIX = "events-active/"  # conditions raised and not over yet: key -> the event
KEEP = 5000  # the oldest events beyond this many are dropped


class Event(BaseModel):
    time: float
    severity: Severity
    kind: str  # e.g. disk_degraded, pool_low_space, backup_failed, host_down, vm_not_restarted
    subject: str  # what it is about: "vm/emr", "pool/fast", "host/h1"
    message: str


Listener = Callable[["Event"], None]
_listeners: weakref.WeakKeyDictionary[Store, list[Listener]] = weakref.WeakKeyDictionary()


def subscribe(store: Store, listener: Listener) -> Callable[[], None]:
    """Call ``listener`` with every event recorded in ``store`` from now on; returns the unsubscribe."""
    _listeners.setdefault(store, []).append(listener)

    def unsubscribe() -> None:
        with_store = _listeners.get(store, [])
        if listener in with_store:
            with_store.remove(listener)

    return unsubscribe


def severity_at_least(severity: Severity, minimum: Severity) -> bool:
    """Whether ``severity`` is ``minimum`` or above (info < warning < error < critical)."""
    return SEVERITIES.index(severity) >= SEVERITIES.index(minimum)


_LOG_LEVEL = {"info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR, "critical": logging.CRITICAL}


class Events:
    def __init__(self, store: Store) -> None:
        self.store = store
        self._last_ns = 0

    async def emit(self, kind: str, subject: str, message: str, severity: Severity = "warning") -> Event:
        """Record one event (and log it)."""
        now_ns = max(time.time_ns(), self._last_ns + 1)
        self._last_ns = now_ns
        ev = Event(time=now_ns / 1e9, severity=severity, kind=kind, subject=subject, message=message)
        await self.store.put(f"{EVENTS_PREFIX}{now_ns:020d}", ev.model_dump(mode="json"))
        log.log(_LOG_LEVEL[severity], "%s %s: %s", kind, subject, message)
        for listener in list(_listeners.get(self.store, ())):
            try:
                listener(ev)
            except Exception:  # a listener's bug never loses an event: it is recorded already
                log.exception("an event listener failed on %s %s", kind, subject)
        if now_ns % 100 == 0:  # now and then, keep the list bounded
            await self._trim()
        return ev

    async def raise_once(
        self, key: str, kind: str, subject: str, message: str, severity: Severity = "warning"
    ) -> Event | None:
        """Emit the event unless the condition ``key`` is already raised; None if it was."""
        if await self.store.get(ACTIVE_PREFIX + key) is not None:
            return None
        ev = await self.emit(kind, subject, message, severity)
        await self.store.put(ACTIVE_PREFIX + key, ev.model_dump(mode="json"))
        return ev

    async def clear(self, key: str, kind: str | None = None, message: str | None = None) -> bool:
        """The condition ``key`` is over; with ``kind`` and ``message`` that is an info event. True if it was raised."""
        entry = await self.store.get(ACTIVE_PREFIX + key)
        if entry is None:
            return False
        await self.store.delete(ACTIVE_PREFIX + key)
        if kind is not None and message is not None:
            await self.emit(kind, Event.model_validate(entry.value).subject, message, "info")
        return True

    async def active_keys(self, prefix: str = "") -> list[str]:
        """The keys of the conditions raised and not over yet that start with ``prefix``."""
        return [e.key.removeprefix(ACTIVE_PREFIX) for e in await self.store.range(ACTIVE_PREFIX + prefix)]

    async def active(self) -> list[Event]:
        """The conditions raised and not over yet."""
        return [Event.model_validate(e.value) for e in await self.store.range(ACTIVE_PREFIX)]

    async def list(self, subject: str | None = None, severity: Severity | None = None, limit: int = 200) -> list[Event]:
        """The latest ``limit`` events, oldest first, optionally of one subject or at least one severity."""
        order = list(SEVERITIES)
        out = []
        for e in await self.store.range(EVENTS_PREFIX):
            ev = Event.model_validate(e.value)
            if subject is not None and ev.subject != subject:
                continue
            if severity is not None and order.index(ev.severity) < order.index(severity):
                continue
            out.append(ev)
        return out[-limit:]

    async def _trim(self) -> None:
        entries = await self.store.range(EVENTS_PREFIX)
        for e in entries[: max(0, len(entries) - KEEP)]:
            await self.store.delete(e.key)
