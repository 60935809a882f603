"""Bounds on request bodies: at most :data:`BODY_MAX` bytes, JSON nested at most :data:`DEPTH_MAX` deep.

Every JSON body kasou takes is small (a VM spec, a user, a pool): 1 MiB is far above any of them. A body
announced larger (``Content-Length``) is refused with ``413`` before a byte of it is read; one sent without
a length (chunked) is counted as it arrives and refused once it passes the bound; a body within the bound
is read here whole and handed on. The answer is kasou's error shape, ``{"code": "too_large", ...}``. A JSON
body (or one without a content type, which FastAPI reads as JSON) has its nesting measured before anything
parses it: Python's parser fails with a RecursionError some thousand levels down, so a body nested deeper
than kasou ever needs is ``422`` here, with one line. Registered in :mod:`kasou.api.app` inside the audit
middleware, so a refused change is still recorded.
"""

from __future__ import annotations

import json
import re

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from kasou.errors import InvalidSpec, KasouError, TooLarge
from kasou.wire import error_body, status_for

BODY_MAX = 1024 * 1024
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
