"""Bounds on request bodies: at most :data:`BODY_MAX` bytes, JSON nested at most :data:`DEPTH_MAX` deep.

Every JSON body kasou takes is small (a VM spec, a user, a pool): 1 MiB is far above any of them. A body
announced larger (``Content-Length``) is refused with ``413`` before a byte of it is read; one sent without
a length (chunked) is counted as it arrives and refused once it passes the bound; a body within the bound
is read here whole and handed on. The answer is kasou's error shape, ``{"code": "too_large", ...}``. A JSON
body (or one without a content type, which FastAPI reads as JSON) has its nesting measured before anything
parses it: Python's parser fails with a RecursionError some thousand levels down, so a body nested deeper
than kasou ever needs is ``422`` here, with one line. Registered in :mod:`kasou.api.app` inside the audit
middleware, so a refused change is still recorded; the body read here is left in the request's scope
(:data:`BODY_SCOPE_KEY`) for the audit record, whether it came with a length or chunked.

Also here: :class:`SignInLimiter`, the bound on failed sign-ins from one source address (``429`` with
``Retry-After``), kept in the memory of the API server that checks sign-ins.
"""

from __future__ import annotations

import ipaddress
import json
import math
import re
import time
from collections import OrderedDict

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from kasou.config import signin_rate
from kasou.errors import InvalidSpec, KasouError, RateLimited, TooLarge
from kasou.wire import error_body, status_for

BODY_MAX = 1024 * 1024
BODY_SCOPE_KEY = "kasou.body"  # the body as read here, for the audit record (kasou.api.audit)
DEPTH_MAX = 32  # kasou's own bodies are 3 deep at most (a VM spec's mirror list)
_TOKEN = re.compile(rb'[\[\]{}"\\]')  # what nesting depends on: brackets, quotes, backslashes


def json_depth(body: bytes, stop_above: int | None = None) -> int:
    """How deep a JSON text nests arrays and objects (brackets in strings do not count), without parsing it:
    one pass over its brackets, quotes and backslashes, ending early once deeper than ``stop_above``."""
    depth = deepest = 0
    in_string = False
    escaped = -1  # the offset of a character a backslash escapes
    for m in _TOKEN.finditer(body):
        i = m.start()
        c = body[i]
        if in_string:
            if i == escaped:
                continue
            if c == 0x5C:  # backslash
                escaped = i + 1
            elif c == 0x22:  # quote
                in_string = False
        elif c == 0x22:
            in_string = True
        elif c in (0x5B, 0x7B):  # [ {
            depth += 1
            deepest = max(deepest, depth)
            if stop_above is not None and deepest > stop_above:
                break
        elif c in (0x5D, 0x7D):  # ] }
            depth -= 1
    return deepest


def _json_like(scope: Scope) -> bool:
    for name, value in scope.get("headers", []):
        if name == b"content-type":
            return b"json" in value.lower()
    return True  # FastAPI reads a body without a content type as JSON


def _too_large(limit: int) -> str:
    return f"the request body is larger than {limit // 1024} KiB"


class _BodyTooLarge(Exception):
    """The body passed the bound as it was read."""


class BodyLimit:
    """ASGI middleware: refuse HTTP request bodies over ``limit`` bytes with 413, and JSON nested deeper than
    :data:`DEPTH_MAX` with 422. The body (at most ``limit`` bytes) is read here and handed on whole."""

    def __init__(self, app: ASGIApp, limit: int = BODY_MAX) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None and declared > self.limit:
            await _refuse(send, self.limit)
            return
        try:
            body = await _read(receive, self.limit)
        except _BodyTooLarge:
            await _refuse(send, self.limit)
            return
        scope[BODY_SCOPE_KEY] = body
        if body and _json_like(scope) and json_depth(body, DEPTH_MAX) > DEPTH_MAX:
            msg = f"the JSON body is nested more than {DEPTH_MAX} levels deep"
            await _send_error(send, InvalidSpec(msg, field="body"))
            return
        await self.app(scope, _replay(body, receive), send)


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", []):
        if name == b"content-length":
            text = value.decode("latin-1").strip()
            return int(text) if text.isdigit() else None
    return None


async def _read(receive: Receive, limit: int) -> bytes:
    parts, seen = [], 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            break
        part = message.get("body", b"")
        seen += len(part)
        if seen > limit:
            raise _BodyTooLarge
        parts.append(part)
        if not message.get("more_body", False):
            break
    return b"".join(parts)


def _replay(body: bytes, receive: Receive) -> Receive:
    """The body read already, then whatever the client sends next (a disconnect)."""
    sent = False

    async def again() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return again


async def _refuse(send: Send, limit: int) -> None:
    await _send_error(send, TooLarge(_too_large(limit)))


async def _send_error(send: Send, err: KasouError) -> None:
    data = json.dumps(error_body(err)).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    await send({"type": "http.response.start", "status": status_for(err), "headers": headers})
    await send({"type": "http.response.body", "body": data})


# -- failed sign-ins from one source address ----------------------------------------------------------

SOURCES_MAX = 10_000  # addresses remembered; beyond, those with their full allowance are forgotten first


def source_key(address: str) -> str:
    """The source a limit counts for: the address, or its /64 for IPv6 (one host usually holds a whole /64)."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address[:100]
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


class SignInLimiter:
    """Failed sign-ins per source address, a token bucket: ``rate`` of them at once, then ``rate`` a minute.

    A sign-in takes a token *before* it is checked and gives it back when it succeeds, so attempts sent all at
    once cannot pass the bound before the first of them fails. An address without a token is refused at once
    (:class:`~kasou.errors.RateLimited`: 429 with ``Retry-After``), before any user is looked at, so it charges
    no account's lock-out either. Kept in memory: sign-ins are checked by one API server (the leader, to which
    followers forward them with the client's address); a restart or a new leader starts the counts afresh."""

    def __init__(self, rate: float | None = None) -> None:
        self._rate = rate
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # source -> (tokens, when)

    @property
    def rate(self) -> float:
        return signin_rate() if self._rate is None else self._rate

    def _tokens(self, key: str, now: float, rate: float) -> float:
        tokens, when = self._buckets.get(key, (rate, now))
        return min(rate, tokens + max(0.0, now - when) * rate / 60.0)

    def take(self, address: str, now: float | None = None) -> None:
        """One attempt from ``address``; RateLimited if it has none left."""
        rate = self.rate
        if rate <= 0:
            return
        now = time.monotonic() if now is None else now
        key = source_key(address)
        tokens = self._tokens(key, now, rate)
        if tokens < 1.0:
            wait = math.ceil((1.0 - tokens) * 60.0 / rate)
            raise RateLimited(f"too many failed sign-ins from {key}: try again in {wait} s", retry_after_s=wait)
        self._buckets[key] = (tokens - 1.0, now)
        self._buckets.move_to_end(key)
        self._trim(now, rate)

    def give_back(self, address: str, now: float | None = None) -> None:
        """The attempt succeeded (or was not a sign-in attempt after all): its token returns."""
        rate = self.rate
        key = source_key(address)
        if rate <= 0 or key not in self._buckets:
            return
        now = time.monotonic() if now is None else now
        tokens = min(rate, self._tokens(key, now, rate) + 1.0)
        if tokens >= rate:
            del self._buckets[key]  # its full allowance: nothing to remember
        else:
            self._buckets[key] = (tokens, now)

    def _trim(self, now: float, rate: float) -> None:
        if len(self._buckets) <= SOURCES_MAX:
            return
        for key in [k for k in self._buckets if self._tokens(k, now, rate) >= rate]:
            del self._buckets[key]
        while len(self._buckets) > SOURCES_MAX:
            self._buckets.popitem(last=False)  # the longest unused
