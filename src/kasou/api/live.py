"""Live updates as server-sent events (``text/event-stream``), for the web UI and scripts.

* ``GET /v1/jobs/{job_id}/events``: one ``job`` event (the whole job record as JSON) each time the
  job changes (state, progress, step), then ``end`` once it has ended. Bounded: after ``timeout``
  seconds (default 900) a ``timeout`` event ends the stream; the client may open it again.
* ``GET /v1/events/stream``: each operator event (degraded disk, pool low on space, failed backup,
  ...) as it is raised (``event``), bounded the same way.

Both follow a store watch (etcd's in a cluster, the SQLite store's change notifications on one host): a
change is sent as it is written, nothing is polled. A comment line (``: keep-alive``) goes out every 15 s so
proxies keep the connection. Every stream needs a permission stated in kasou.api.permissions: a job's events
"vm.read" on its VM, the operator events "read".
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import StreamingResponse

from kasou.api.auth import Principal
from kasou.api.watches import Changes
from kasou.control.events import EVENTS_PREFIX, Event
from kasou.control.records import job_key
from kasou.errors import NotFound

KEEPALIVE_S = 15.0
DISCONNECT_CHECK_S = 1.0  # how often a stream without changes looks whether its client has gone
SSE_HEADERS = {"Cache-Control": "no-store", "X-Accel-Buffering": "no"}


def sse(event: str, data: Any, event_id: int | None = None) -> str:
    """One server-sent event; ``data`` as compact JSON on a single line."""
    head = f"id: {event_id}\n" if event_id is not None else ""
    return f"{head}event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"


def live_routes(svc: Callable[[], Any], principal: Callable[[Request], Awaitable[Principal]]) -> APIRouter:
    # Who may follow what is checked before the routes run (kasou.api.permissions): a job's events
    # need "vm.read" on the job's VM, the operator events "read".
    del principal
    r = APIRouter(prefix="/v1")

    @r.get(
        "/jobs/{job_id}/events",
        response_class=StreamingResponse,
        responses={200: {"content": {"text/event-stream": {}}, "description": "job, end and timeout events"}},
    )
    async def job_events(
        job_id: str, request: Request, timeout: float = Query(900.0, gt=0, le=3600)
    ) -> StreamingResponse:
        """The job's record each time it changes, until it ends (``end``) or ``timeout`` seconds pass."""
        jobs = svc().jobs
        first = await jobs.get(job_id)  # an unknown job is a 404 before any stream starts

        async def stream() -> AsyncIterator[str]:
            deadline = time.monotonic() + timeout
            async with svc().store.watch(job_key(job_id)) as watch:  # the watch first: no change is lost
                changes = Changes(watch)
                try:
                    last, n, beat = "", 0, time.monotonic()
                    rec = first
                    while True:
                        body = rec.model_dump(mode="json")
                        text = json.dumps(body, sort_keys=True)
                        if text != last:
                            last, n, beat = text, n + 1, time.monotonic()
                            yield sse("job", body, n)
                        if rec.done:
                            yield sse("end", {"id": rec.id, "state": rec.state.value}, n + 1)
                            return
                        if (left := deadline - time.monotonic()) <= 0:
                            yield sse("timeout", {"id": rec.id, "after_s": timeout})
                            return
                        if time.monotonic() - beat >= KEEPALIVE_S:
                            beat = time.monotonic()
                            yield ": keep-alive\n\n"
                        if await request.is_disconnected():
                            return
                        try:
                            ev = await changes.get(min(left, KEEPALIVE_S, DISCONNECT_CHECK_S))
                        except StopAsyncIteration:
                            return
                        if ev is not None:
                            try:
                                rec = await jobs.get(job_id)
                            except NotFound:  # removed meanwhile (jobs are trimmed): nothing more to follow
                                return
                finally:
                    await changes.close()

        return StreamingResponse(stream(), media_type="text/event-stream", headers=SSE_HEADERS)

    @r.get(
        "/events/stream",
        response_class=StreamingResponse,
        responses={200: {"content": {"text/event-stream": {}}, "description": "event and timeout events"}},
    )
    async def event_stream(request: Request, timeout: float = Query(300.0, gt=0, le=3600)) -> StreamingResponse:
        """Operator events as they are raised from now on, for ``timeout`` seconds."""

        async def stream() -> AsyncIterator[str]:
            deadline = time.monotonic() + timeout
            async with svc().store.watch(EVENTS_PREFIX) as watch:  # from now on: raised after the request came
                changes = Changes(watch)
                try:
                    beat, n = time.monotonic(), 0
                    yield ": connected\n\n"
                    while (left := deadline - time.monotonic()) > 0:
                        if await request.is_disconnected():
                            return
                        try:
                            ev = await changes.get(min(left, DISCONNECT_CHECK_S))
                        except StopAsyncIteration:
                            return
                        if ev is not None and ev.kind == "put" and ev.value is not None:
                            n += 1
                            beat = time.monotonic()
                            yield sse("event", json.loads(Event.model_validate(ev.value).model_dump_json()), n)
                        if time.monotonic() - beat >= KEEPALIVE_S:
                            beat = time.monotonic()
                            yield ": keep-alive\n\n"
                    yield sse("timeout", {"after_s": timeout})
                finally:
                    await changes.close()

        return StreamingResponse(stream(), media_type="text/event-stream", headers=SSE_HEADERS)

    return r
