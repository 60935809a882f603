"""The audit log in the API: the middleware that records every state-changing request, and ``/v1/audit``.

Recorded: every POST, PUT, PATCH and DELETE under ``/v1``, also refused ones (401, 403, 4xx, 5xx), after it
was handled: who (the principal, when the request got that far), from where (the client's address), what
(method and path, the query and the JSON body with secrets redacted), on what (``vms/NAME``...) and the
result (status, kasou's error code and message, the job it started). ``POST /v1/auth/login`` is recorded
as ``login`` or ``login_failed``, ``/v1/auth/logout`` as ``logout``. Reads (GET, HEAD) are not recorded.

In a cluster a follower forwards a change to the leader: the follower marks the request and does not
record it; the leader records it once, with the client's address the follower passed on
(``X-Kasou-Forwarded-For``) and the follower's own address as ``details.forwarded_by``.

The body recorded is the one :class:`kasou.api.limits.BodyLimit` read (sent with a length or chunked); one
over :data:`BODY_MAX` is recorded by its size only. Anonymous failures (a refused request that never got as far
as a principal: a wrong or missing token, a failed sign-in) are bounded so that a flood cannot grow the log
without end: :data:`ANON_BURST` of them from one address in :data:`ANON_WINDOW_S` seconds (and
:data:`ANON_TOTAL` from all addresses) are recorded one by one; the rest become one ``anonymous_failures``
record an address when the window ends ("N more anonymous failures from ADDR in the last M s", with the
actions and targets tried), at most :data:`ANON_SOURCES` addresses one by one and the others in one record.
"""

from __future__ import annotations

import asyncio
import csv
import hashlib
import hmac
import io
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import PlainTextResponse, Response

from kasou.api.auth import Principal
from kasou.api.limits import BODY_SCOPE_KEY
from kasou.api.review_html import render as render_review
from kasou.control import audit
from kasou.control.audit import Checkpoint, VerifyReport
from kasou.control.review import DEFAULT_HOURS, DEFAULT_TZ, Review, Reviewer
from kasou.errors import Forbidden, NotFound

if TYPE_CHECKING:
    from kasou.api.deps import Services

log = logging.getLogger(__name__)

CHANGING = frozenset({"POST", "PUT", "PATCH", "DELETE"})
FORWARDED_FOR = "x-kasou-forwarded-for"  # set by a follower that forwards a change to the leader
FORWARDED_SIG = "x-kasou-forwarded-sig"  # "<unix time>:<HMAC-SHA256 hex>", keyed with the site's API token
FORWARDED_MAX_AGE_S = 120.0


def _forward_mac(key: str, client: str, method: str, path: str, ts: int) -> str:
    msg = f"{client}\n{method}\n{path}\n{ts}".encode()
    return hmac.new(key.encode(), msg, hashlib.sha256).hexdigest()


def sign_forwarded(key: str, client: str, method: str, path: str, now: float | None = None) -> dict[str, str]:
    """The headers a follower adds when it forwards a change: the client's address, signed with the
    API token every host of the site holds, so the leader can tell a follower from anyone with a token."""
    ts = int(time.time() if now is None else now)
    return {FORWARDED_FOR: client, FORWARDED_SIG: f"{ts}:{_forward_mac(key, client, method, path, ts)}"}


def verified_forwarded(key: str | None, request: Request, now: float | None = None) -> str | None:
    """The client address a follower passed on, if its signature holds (else None)."""
    client, sig = request.headers.get(FORWARDED_FOR), request.headers.get(FORWARDED_SIG, "")
    if not client or not key or ":" not in sig:
        return None
    ts_text, mac = sig.split(":", 1)
    if not ts_text.isdigit() or abs((time.time() if now is None else now) - int(ts_text)) > FORWARDED_MAX_AGE_S:
        return None
    good = _forward_mac(key, client, request.method, request.url.path, int(ts_text))
    return client if hmac.compare_digest(good, mac) else None


BODY_MAX = 64 * 1024  # request and response bodies read for the record at most this long
NAMED = {"/v1/auth/login": "login", "/v1/auth/logout": "logout", "/v1/users/break-glass": "break_glass_rotate",
         "/v1/users/break-glass/acknowledge": "break_glass_acknowledge"}  # fmt: skip


def mark_forwarded(request: Request) -> None:
    """A follower forwards this request to the leader, which records it: do not record it here."""
    request.state.audit_forwarded = True


def _target(path: str, body: Any) -> str:
    parts = [p for p in path.removeprefix("/v1/").split("/") if p]
    if path == "/v1/auth/login":
        name = body.get("name") if isinstance(body, dict) else None
        return f"users/{str(name)[:100]}" if name else "users"
    if len(parts) >= 2:
        return "/".join(parts[:2])
    if parts and isinstance(body, dict) and isinstance(body.get("name"), str):
        return f"{parts[0]}/{body['name'][:100]}"  # a create: the new thing's name
    return parts[0] if parts else ""


def _json(data: bytes) -> Any:
    if not data or len(data) > BODY_MAX:
        return None
    try:
        return json.loads(data)
    except (ValueError, UnicodeDecodeError, RecursionError):  # RecursionError: nested too deep (kasou.api.limits)
        return None


async def _replay(data: bytes) -> AsyncIterator[bytes]:
    yield data


def _client_source(request: Request, key: str | None) -> tuple[str, dict[str, Any]]:
    """The client's address (a follower's signed ``X-Kasou-Forwarded-For`` believed, an unsigned one only noted)
    and what the record says about it."""
    source = request.client.host if request.client else ""
    notes: dict[str, Any] = {}
    forwarded = verified_forwarded(key, request)
    if forwarded:
        notes["forwarded_by"] = source
        source = forwarded[:100]
    elif request.headers.get(FORWARDED_FOR):  # claimed by a caller that cannot sign it: noted, not believed
        notes["forwarded_for_unverified"] = request.headers[FORWARDED_FOR][:100]
    return source, notes


def client_source(request: Request) -> str:
    """The address a change came from, as the audit record has it (the client's, also behind a follower)."""
    known = getattr(request.state, "client_source", None)
    if isinstance(known, str):
        return known
    return request.client.host if request.client else ""


# -- anonymous failures: bounded ---------------------------------------------------------------

ANON_WINDOW_S = 60.0
ANON_BURST = 10  # anonymous failures from one address recorded one by one in a window (as many as sign-ins allow)
ANON_TOTAL = 100  # ... and from all addresses
ANON_SOURCES = 50  # addresses whose other failures get an aggregate record each; the rest share one
ANON_NAMED = 10  # distinct actions and targets named in an aggregate record
OTHERS = "(other addresses)"


@dataclass
class _Held:
    """The anonymous failures of one address not recorded one by one in the current window."""

    count: int = 0
    actions: dict[str, int] = field(default_factory=dict)
    targets: dict[str, int] = field(default_factory=dict)
    sources: set[str] = field(default_factory=set)  # for OTHERS: the addresses summed up in it

    def add(self, action: str, target: str, source: str) -> None:
        self.count += 1
        for seen, what in ((self.actions, action), (self.targets, target)):
            if what in seen or len(seen) < ANON_NAMED:
                seen[what] = seen.get(what, 0) + 1
        if len(self.sources) < 1000:
            self.sources.add(source)


class AnonymousFailures:
    """Which anonymous failures are recorded one by one, and the count of the others, window by window."""

    def __init__(self) -> None:
        self.started: float | None = None  # the current window's start (monotonic)
        self.seen: dict[str, int] = {}  # address -> failures recorded one by one in the window
        self.recorded = 0
        self.held: dict[str, _Held] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    def _roll(self, now: float) -> tuple[float, dict[str, _Held]]:
        """End the window if its time is over: its length and what it held (to record)."""
        if self.started is None or now - self.started < ANON_WINDOW_S:
            return 0.0, {}
        length, held = now - self.started, self.held
        self.started, self.seen, self.recorded, self.held = None, {}, 0, {}
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        return length, held

    def admit(self, source: str, action: str, target: str, now: float, svc: Services) -> bool:
        """True: record this failure in full; False: it is counted for its address's aggregate record."""
        if self.started is None:
            self.started = now
        n = self.seen.get(source, 0)
        if n < ANON_BURST and self.recorded < ANON_TOTAL and (source in self.seen or len(self.seen) < 10_000):
            self.seen[source] = n + 1
            self.recorded += 1
            return True
        key = source if source in self.held or len(self.held) < ANON_SOURCES else OTHERS
        self.held.setdefault(key, _Held()).add(action, target, source)
        if self._timer is None:  # the aggregate is written when the window ends, even if nothing else comes
            loop = asyncio.get_running_loop()
            delay = max(0.0, self.started + ANON_WINDOW_S - now) + 0.05
            self._timer = loop.call_later(delay, self._spawn_flush, svc)
        return False

    def _spawn_flush(self, svc: Services) -> None:
        self._timer = None
        task = asyncio.get_running_loop().create_task(self.flush(svc))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def flush(self, svc: Services, now: float | None = None) -> None:
        """Record the aggregates of a window that has ended (nothing if it has not)."""
        length, held = self._roll(time.monotonic() if now is None else now)
        for source, h in held.items():
            where = f"{len(h.sources)} other addresses" if source == OTHERS else source
            details: dict[str, Any] = {"count": h.count, "window_s": round(length, 1), "actions": h.actions,
                                       "targets": h.targets}  # fmt: skip
            if source == OTHERS:
                details["addresses"] = sorted(h.sources)[:ANON_NAMED]
            await audit.record(
                svc.store, "anonymous_failures", source="" if source == OTHERS else source, ok=False,
                message=f"{h.count} more anonymous failures from {where} in the last {length:.0f} s",
                details=details,
            )  # fmt: skip


def audit_middleware(
    services: Callable[[], Services | None],
    key: str | None = None,
) -> Callable[[Request, Callable[[Request], Awaitable[Response]]], Awaitable[Response]]:
    anonymous = AnonymousFailures()

    async def audit_requests(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        path = request.url.path
        svc = services()
        if svc is not None and anonymous.started is not None:
            await anonymous.flush(svc)  # a window that has ended: its aggregates first
        if request.method not in CHANGING or not path.startswith("/v1/") or svc is None:
            return await call_next(request)
        source, notes = _client_source(request, key)
        request.state.client_source = source
        try:
            response = await call_next(request)
        except Exception as e:
            body = request.scope.get(BODY_SCOPE_KEY, b"")
            await _record(svc, request, body, 500, None, f"{type(e).__name__}", source, notes, anonymous)
            raise
        if getattr(request.state, "audit_forwarded", False):
            return response
        out = b""
        length = response.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) <= BODY_MAX:
            out = b"".join([c if isinstance(c, bytes) else c.encode() async for c in response.body_iterator])  # type: ignore[attr-defined]
            response.body_iterator = _replay(out)  # type: ignore[attr-defined]
        body = request.scope.get(BODY_SCOPE_KEY, b"")  # as kasou.api.limits read it: with a length or chunked
        await _record(svc, request, body, response.status_code, _json(out), "", source, notes, anonymous)
        return response

    return audit_requests


async def _record(
    svc: Services,
    request: Request,
    body: bytes,
    status: int,
    answer: Any,
    crash: str,
    source: str,
    notes: dict[str, Any],
    anonymous: AnonymousFailures,
) -> None:
    path = request.url.path
    sent = _json(body)
    ok = status < 400
    action = NAMED.get(path) or f"{request.method} {path}"
    if action == "login" and not ok:
        action = "login_failed"
    actor: Any = getattr(request.state, "principal", None)
    if action == "login" and isinstance(answer, dict):
        actor = {"name": answer.get("name"), "role": answer.get("role"), "via": answer.get("via") or "session"}
    target = _target(path, sent)
    if actor is None and not ok and not anonymous.admit(source, action, target, time.monotonic(), svc):
        return  # one more anonymous failure: in its address's aggregate record
    details: dict[str, Any] = {}
    if request.query_params:
        details["query"] = dict(request.query_params)
    if action == "login" and isinstance(answer, dict) and answer.get("source") == "directory":
        details.update(source="directory", groups=answer.get("groups", []))  # the groups that gave the role
    if isinstance(sent, dict) and action not in ("login", "login_failed"):
        details["body"] = sent
    elif body and sent is None:
        details["body_bytes"] = len(body)
    details.update(notes)
    window = getattr(request.state, "window", None)
    if isinstance(window, str):
        details["window"] = window  # the vendor's maintenance window it was done under (kasou.api.windows)
    code, message = None, crash
    if isinstance(answer, dict):
        if not ok:
            code, message = answer.get("code"), str(answer.get("message") or answer.get("detail") or "")
        job = answer.get("job")
        if isinstance(job, dict) and isinstance(job.get("id"), str):
            details["job"] = job["id"]
    await audit.record(
        svc.store, action, actor=actor, source=source, target=target, ok=ok, status=status,
        code=str(code) if code else None, message=message, details=details,
    )  # fmt: skip


# -- /v1/audit --------------------------------------------------------------------------------

CSV_COLUMNS = ["seq", "time", "host", "clock", "actor", "role", "via", "source", "action", "target", "ok", "status",
               "code", "message", "details", "prev_hash", "hash"]  # fmt: skip


def _cell(value: Any) -> str:
    text = "" if value is None else value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    return "'" + text if text[:1] in ("=", "+", "-", "@", "\t", "\r") else text  # no formulas in a spreadsheet


def to_csv(records: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(CSV_COLUMNS)
    for r in records:
        a, res = r.get("actor") or {}, r.get("result") or {}
        row = [r.get("seq"), r.get("time"), r.get("host"), r.get("clock"), a.get("name"), a.get("role"), a.get("via"),
               r.get("source"), r.get("action"), r.get("target"), res.get("ok"), res.get("status"), res.get("code"),
               res.get("message"), r.get("details"), r.get("prev_hash"), r.get("hash")]  # fmt: skip
        w.writerow([_cell(v) for v in row])
    return buf.getvalue()


def audit_routes(svc: Callable[[], Services], principal: Callable[[Request], Awaitable[Principal]]) -> APIRouter:
    r = APIRouter(prefix="/v1/audit")

    async def auditor(request: Request) -> Principal:
        """Auditors (permission "audit") and administrators read the audit log."""
        p = await principal(request)
        if not (p.can("audit") or p.can("users")):
            raise Forbidden(f"user {p.name!r} ({p.role.value}) may not read the audit log (needs 'audit')")
        return p

    def log() -> audit.AuditLog:
        return audit.for_store(svc().store)

    @r.get("/records", dependencies=[Depends(auditor)])
    async def audit_records(
        since: str | None = None,
        actor: str | None = None,
        target: str | None = None,
        action: str | None = None,
        limit: int = Query(1000, ge=1, le=100000),
    ) -> list[dict[str, Any]]:
        """Records, oldest first (the last ``limit``): since an ISO time, by a user, on a target (or a prefix of
        it), whose action contains ``action``."""
        return await log().records(since, actor, target, action, limit)

    @r.get("/verify", dependencies=[Depends(auditor)])
    async def audit_verify() -> VerifyReport:
        """Walk the chain and the signed checkpoints; ``problem`` is the first one found (``ok`` when none)."""
        return await log().verify()

    @r.get("/export", dependencies=[Depends(auditor)], response_class=Response)
    async def audit_export(format: Literal["csv", "json"] = "json") -> Response:
        """The whole log: CSV (one row a record) or JSON (records and checkpoints, verifiable elsewhere)."""
        store = svc().store
        records = [e.value for e in await store.range(audit.PREFIX)]
        if format == "csv":
            return PlainTextResponse(to_csv(records), media_type="text/csv; charset=utf-8")
        cps = [e.value for e in await store.range(audit.CHECKPOINT_PREFIX)]
        body = {"records": records, "checkpoints": cps, "public_key": await log().public_key_pem()}
        return Response(json.dumps(body, ensure_ascii=False, indent=1), media_type="application/json")

    @r.get("/public-key", dependencies=[Depends(auditor)], response_class=PlainTextResponse)
    async def audit_public_key() -> str:
        """The site's checkpoint signing public key (PEM), for verifiers elsewhere."""
        return await log().public_key_pem()

    @r.post("/checkpoint", dependencies=[Depends(auditor)])
    async def audit_checkpoint() -> Checkpoint | None:
        """Seal the log as it is now with a signed checkpoint (null while the log is empty)."""
        return await log().checkpoint()

    @r.get("/review", response_model=None,
           responses={200: {"model": Review, "content": {"text/html": {"schema": {"type": "string"}}}}})  # fmt: skip
    async def audit_review(
        request: Request,
        since: str = Query("30d", max_length=40),
        until: str | None = Query(None, max_length=40),
        department: list[str] = Query([]),
        format: Literal["json", "html"] = "json",
        lang: Literal["ja", "en"] = "ja",
        tz: str = Query(DEFAULT_TZ, max_length=64),
        hours: str = Query(DEFAULT_HOURS, max_length=20),
        weekends: bool = True,
    ) -> Review | Response:
        """The access-log review of a period (the month's report an information-security officer signs): the
        chain's verification, sign-ins, failures and lock-outs, break-glass uses, vendors' windows, console
        sessions, permission changes, unusual hours (outside ``hours`` in ``tz``, and weekends). ``since`` and
        ``until``: 30d, 12h, 2w or an ISO date or time. A department's manager reviews their departments only."""
        p = await auditor(request)
        chosen = list(dict.fromkeys(department)) or None
        if p.scoped:
            outside = [d for d in chosen or [] if d not in p.departments]
            if outside:
                raise NotFound(f"no department {outside[0][:40]!r} among those of user {p.name!r}")
            chosen = chosen or list(p.departments)
        rev = await Reviewer(svc().store, svc().windows).review(since, until, chosen, tz, hours, weekends)
        if format == "html":
            return Response(render_review(rev, lang), media_type="text/html; charset=utf-8")
        return rev

    @r.get("/status", dependencies=[Depends(auditor)])
    async def audit_status() -> dict[str, Any]:
        """This server's counters: records appended, lost races, failures, checkpoints, syslog."""
        a = log()
        out: dict[str, Any] = dict(a.stats)
        if a.syslog is not None:
            out["syslog"] = {"target": a.syslog.target, "sent": a.syslog.sent, "failures": a.syslog.failures,
                             "last_error": a.syslog.last_error}  # fmt: skip
        return out

    return r
