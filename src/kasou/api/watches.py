"""``GET /v1/vms?watch=true`` and ``GET /v1/events?watch=true``: a list, then its changes, as server-sent events.

The same path and filters as the plain list; with ``watch=true`` the answer is ``text/event-stream``, made by
FastAPI's own SSE support (``EventSourceResponse``, ``ServerSentEvent``; it also sends a ``: ping`` comment
after 15 s without an event, so proxies keep the connection). The changes come from a store watch
(:meth:`kasou.store.base.Store.watch`: etcd's watch in a cluster, the SQLite store's change notifications on
one host), never from polling the list.

VMs (``/v1/vms?watch=true``):

* ``list``: the VMs the plain ``GET /v1/vms`` with the same filters answers, the same JSON;
* ``added``, ``modified``: a VM's view (as the list shows it) when its record changes and it is, or has come
  into, what the caller sees through the filters; ``deleted``: its last view, when it is gone or no longer
  shown (deleted, moved out of the caller's departments or out of the filters);
* ``timeout``: after ``timeout`` seconds (default 300), then the stream ends; an EventSource opens it again
  (``retry``: 2 s) and gets a fresh ``list``.

What the caller may see is decided exactly as for the list (``vm.read``, a department-scoped user's
departments, a vendor's active windows), for every change again; and every ``REFRESH_S`` the caller's
credentials and permission are checked again, so a session signed out or a user disabled since the stream
began ends it (``error``) within that time. What only the hosts know (guest readiness, the guest agent's
report) is not in the store: every ``REFRESH_S`` the whole list is read again and what changed is sent (the
guest's uptime and heartbeat age, which change every second, do not count as a change). A vendor's stream is
read again every ``WINDOWED_REFRESH_S`` (as often as the dashboard polled before), since their windows start
and end with the clock.

Events (``/v1/events?watch=true``): ``list`` (as ``GET /v1/events`` with the same ``subject``, ``severity`` and
``limit``), then ``event`` for each new one it would show, then ``timeout``.

Both paths are routed here only when ``watch`` is true (:class:`WatchRoute`); the plain routes in
:mod:`kasou.api.app` document the parameter and the stream, and answer every other request.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any
from urllib.parse import parse_qsl

from fastapi import APIRouter, Depends, Query, Request
from fastapi.routing import APIRoute
from fastapi.sse import EventSourceResponse, ServerSentEvent
from starlette.routing import Match
from starlette.types import Scope

from kasou.api.deps import Services
from kasou.control.base import VMView
from kasou.control.events import EVENTS_PREFIX, Event, Severity, kept
from kasou.errors import KasouError, NotFound
from kasou.model.selection import VMFilter
from kasou.model.state import VMState
from kasou.model.users import WINDOW_ROLES
from kasou.store.base import Watch, WatchEvent

VMS_PREFIX = "vms/"
REFRESH_S = 30.0  # what only the hosts know is read again this often
WINDOWED_REFRESH_S = 5.0  # for a vendor, whose reach changes when a maintenance window starts or ends
RETRY_MS = 2000  # how long an EventSource waits before it opens an ended stream again
DEFAULT_TIMEOUT_S = 300.0
VOLATILE = ("uptime_s", "heartbeat_age_s")  # change every second: not a change of the VM
TRUE = {"1", "true", "t", "yes", "y", "on"}  # what pydantic reads as true

#: For one request: a predicate "may the caller see this VM" (scope and, for a vendor, active windows, as the list).
Visibility = Callable[[Request], Awaitable[Callable[[VMView], bool]]]
#: For one request: check its credentials and the route's permission again (raises KasouError when refused now).
Recheck = Callable[[Request], Awaitable[None]]


class WatchRoute(APIRoute):
    """A route that takes a request only when its query says ``watch`` is true; otherwise the next route does."""

    def matches(self, scope: Scope) -> tuple[Match, Scope]:
        if scope.get("type") == "http":
            query = parse_qsl(scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True)
            if not any(k == "watch" and v.strip().lower() in TRUE for k, v in query):
                return Match.NONE, {}
        return super().matches(scope)


def vm_filter(
    state: VMState | None = None, host: str | None = None, department: str | None = None, tag: list[str] = Query([])
) -> VMFilter:
    """The list's filters, checked before any stream starts (bad input: 422, as for the list)."""
    f = VMFilter(state=state, host=host, department=department, tags=tag)
    f.check()
    return f


def _same(a: VMView, b: VMView) -> bool:
    return a.model_dump(mode="json", exclude=set(VOLATILE)) == b.model_dump(mode="json", exclude=set(VOLATILE))


class Changes:
    """A store watch read one event at a time with a bound on each wait, the pending read kept across waits."""

    def __init__(self, watch: Watch) -> None:
        self.watch = watch
        self._next: asyncio.Task[WatchEvent] | None = None

    async def get(self, within: float) -> WatchEvent | None:
        """The next change, or None if none came within ``within`` seconds. StopAsyncIteration when it ended."""
        if self._next is None:
            self._next = asyncio.ensure_future(anext(self.watch))
        done, _ = await asyncio.wait({self._next}, timeout=max(0.0, within))
        if not done:
            return None
        task, self._next = self._next, None
        return task.result()

    async def close(self) -> None:
        if self._next is not None:
            self._next.cancel()
            await asyncio.gather(self._next, return_exceptions=True)
            self._next = None


def watch_routes(svc: Callable[[], Services], visibility: Visibility, recheck: Recheck) -> APIRouter:
    r = APIRouter(prefix="/v1", route_class=WatchRoute)

    @r.get("/vms", response_class=EventSourceResponse, include_in_schema=False)
    async def watch_vms(
        request: Request,
        f: VMFilter = Depends(vm_filter),
        timeout: float = Query(DEFAULT_TIMEOUT_S, gt=0, le=3600),
    ) -> AsyncIterator[ServerSentEvent]:
        async def shown() -> dict[str, VMView]:
            sees = await visibility(request)
            views = [v for v in await svc().vms.list_all() if sees(v)]
            return {v.name: v for v in views if f.matches(v.state, v.host, v.department, v.tags)}

        async def one(name: str, deleted: bool) -> VMView | None:
            if deleted:
                return None
            try:
                view = await svc().vms.get(name)
            except NotFound:
                return None
            sees = await visibility(request)
            return view if sees(view) and f.matches(view.state, view.host, view.department, view.tags) else None

        n = 0

        def sse(event: str, data: Any) -> ServerSentEvent:
            nonlocal n
            n += 1
            return ServerSentEvent(event=event, data=data, id=str(n))

        def change(sent: dict[str, VMView], name: str, view: VMView | None) -> ServerSentEvent | None:
            before = sent.get(name)
            if view is None:
                if before is None:
                    return None
                del sent[name]
                return sse("deleted", before.model_dump(mode="json"))
            sent[name] = view
            if before is None:
                return sse("added", view.model_dump(mode="json"))
            return None if _same(before, view) else sse("modified", view.model_dump(mode="json"))

        async with svc().store.watch(VMS_PREFIX) as watch:  # first the watch, then the list: nothing in between lost
            changes = Changes(watch)
            try:
                sent = await shown()
                yield ServerSentEvent(
                    event="list", data=[v.model_dump(mode="json") for v in sent.values()], id="0", retry=RETRY_MS
                )
                windowed = getattr(getattr(request.state, "principal", None), "role", None) in WINDOW_ROLES
                every = WINDOWED_REFRESH_S if windowed else REFRESH_S
                deadline = time.monotonic() + timeout
                refresh = time.monotonic() + every
                while (left := deadline - time.monotonic()) > 0:
                    try:
                        ev = await changes.get(min(left, refresh - time.monotonic()))
                    except StopAsyncIteration:
                        return
                    if ev is not None and ev.kind != "resync":
                        name = ev.key.removeprefix(VMS_PREFIX)
                        out = change(sent, name, await one(name, ev.kind == "delete"))
                        if out is not None:
                            yield out
                    if (ev is not None and ev.kind == "resync") or time.monotonic() >= refresh:
                        # also while changes keep coming: what only the hosts know, and the caller's credentials
                        refresh = time.monotonic() + every
                        await recheck(request)
                        now = await shown()
                        for name in sorted(set(sent) | set(now)):
                            out = change(sent, name, now.get(name))
                            if out is not None:
                                yield out
                yield ServerSentEvent(event="timeout", data={"after_s": timeout})
            except KasouError as e:  # the store or a host failed mid-stream: say why; the client opens it again
                yield ServerSentEvent(event="error", data=e.to_dict())
            finally:
                await changes.close()

    @r.get("/events", response_class=EventSourceResponse, include_in_schema=False)
    async def watch_events(
        request: Request,
        subject: str | None = None,
        severity: Severity | None = None,
        limit: int = Query(200, ge=1, le=5000),
        timeout: float = Query(DEFAULT_TIMEOUT_S, gt=0, le=3600),
    ) -> AsyncIterator[ServerSentEvent]:
        async with svc().store.watch(EVENTS_PREFIX) as watch:
            changes = Changes(watch)
            try:
                first = await svc().vms.events.list(subject, severity, limit)
                yield ServerSentEvent(
                    event="list", data=[e.model_dump(mode="json") for e in first], id="0", retry=RETRY_MS
                )
                deadline, n = time.monotonic() + timeout, 0
                refresh = time.monotonic() + REFRESH_S
                while (left := deadline - time.monotonic()) > 0:
                    try:
                        ev = await changes.get(min(left, refresh - time.monotonic()))
                    except StopAsyncIteration:
                        return
                    if time.monotonic() >= refresh:
                        refresh = time.monotonic() + REFRESH_S
                        await recheck(request)
                    if ev is None or ev.kind != "put" or ev.value is None:
                        continue  # a trimmed old event, or a resync: nothing new to show
                    event = Event.model_validate(ev.value)
                    if kept(event, subject, severity):
                        n += 1
                        yield ServerSentEvent(event="event", data=json.loads(event.model_dump_json()), id=str(n))
                yield ServerSentEvent(event="timeout", data={"after_s": timeout})
            except KasouError as e:
                yield ServerSentEvent(event="error", data=e.to_dict())
            finally:
                await changes.close()

    return r
