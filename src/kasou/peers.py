"""Which mutual-TLS peers may call: kasou hosts only, not everything the site CA signed.

uvicorn does not hand a connection's client certificate to the application, so :func:`uvicorn_options`
gives it HTTP and websocket protocols that put it in each request's scope as the ASGI TLS extension
(``scope["extensions"]["tls"]["client_cert_chain"]``, PEM). :class:`KasouPeers`, an ASGI middleware,
then refuses (403, one line) a request from a peer that is not a kasou host (:func:`kasou.pki.peer_refusal`):
on an agent every request that came over TLS, on the API the changes a follower forwards to the leader.
A request without TLS (the agent's unix socket, an API on loopback plain HTTP, in-process tests) has no
certificate to check and passes.
"""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any
from urllib.parse import urlsplit

from kasou import pki
from kasou.errors import Forbidden, KasouError
from kasou.wire import error_body, status_for

log = logging.getLogger(__name__)

Scope = dict[str, Any]
ASGIApp = Callable[[Scope, Callable[[], Awaitable[Any]], Callable[[Any], Awaitable[None]]], Awaitable[None]]
KnownHosts = Callable[[], Awaitable[Iterable[str]]]  # names and addresses of the hosts of the registry
Revoked = Callable[[], Awaitable[set[int]]]  # the serial numbers of the revoked certificates
REVOKED_FRESH_S = 5.0  # how old the revoked serials a peer is checked against may be

_NO_CERT = object()


def _tls_extension(transport: asyncio.BaseTransport) -> dict[str, Any] | None:
    """The ASGI TLS extension of a connection: None when it is not TLS."""
    obj = transport.get_extra_info("ssl_object")
    if not isinstance(obj, ssl.SSLObject | ssl.SSLSocket):
        return None
    der = obj.getpeercert(binary_form=True)
    return {
        "server_cert": None,
        "client_cert_chain": [ssl.DER_cert_to_PEM_cert(der)] if der else [],
        "client_cert_name": None,
        "client_cert_error": None,
        "tls_version": None,
        "cipher_suite": None,
    }


def _with_tls_scope(base: type[Any]) -> type[Any]:
    """``base`` (one of uvicorn's protocol classes) putting the connection's TLS extension in every scope."""

    class WithTlsScope(base):
        app: ASGIApp

        def connection_made(self, transport: asyncio.Transport) -> None:
            super().connection_made(transport)
            ext = _tls_extension(transport)
            if ext is None:
                return
            app = self.app

            async def with_tls(scope: Scope, receive: Any, send: Any) -> None:
                scope["extensions"] = {**(scope.get("extensions") or {}), "tls": ext}
                await app(scope, receive, send)

            self.app = with_tls

    WithTlsScope.__name__ = WithTlsScope.__qualname__ = f"{base.__name__}WithTlsScope"
    return WithTlsScope


def uvicorn_options() -> dict[str, Any]:
    """uvicorn's ``http`` and ``ws`` settings that hand the client certificate to the application."""
    from uvicorn.protocols.http.auto import AutoHTTPProtocol
    from uvicorn.protocols.websockets.auto import AutoWebSocketsProtocol

    out: dict[str, Any] = {"http": _with_tls_scope(AutoHTTPProtocol)}
    if AutoWebSocketsProtocol is not None:
        out["ws"] = _with_tls_scope(AutoWebSocketsProtocol)  # type: ignore[arg-type]
    return out


def tls_peer(scope: Scope) -> object:
    """The peer of a request: None when it did not come over TLS, ``_NO_CERT`` over TLS without a
    client certificate, else its :class:`kasou.pki.Peer`."""
    ext = (scope.get("extensions") or {}).get("tls")
    if ext is None:
        return None
    chain = ext.get("client_cert_chain") or []
    return pki.peer_of(chain[0]) if chain else _NO_CERT


def revoked_cache(read: Revoked, fresh_s: float = REVOKED_FRESH_S) -> Revoked:
    """``read``, again in the background once the last read is ``fresh_s`` old: a request waits for the first read
    only, never for a slow store after that. A failed read keeps the last set (a revocation is never undone)."""
    cache: dict[str, Any] = {"at": None, "serials": set(), "task": None}

    async def refresh() -> None:
        try:
            cache["serials"] = await read()
            cache["at"] = time.monotonic()
        except KasouError as e:
            log.warning("the revoked certificates could not be read (%s); using the last list", e.message)
            cache["at"] = cache["at"] if cache["at"] is not None else time.monotonic() - fresh_s / 2
        finally:
            cache["task"] = None

    async def serials() -> set[int]:
        first = cache["at"] is None
        if cache["task"] is None and (first or time.monotonic() - cache["at"] >= fresh_s):
            cache["task"] = asyncio.create_task(refresh())
        if first and cache["task"] is not None:
            await asyncio.shield(cache["task"])
        return set(cache["serials"])

    return serials


def registry_names(records: Iterable[tuple[str, dict[str, Any]]]) -> list[str]:
    """The names and agent addresses of host records (``hosts/<name>``: ``agent_url``)."""
    out = []
    for name, rec in records:
        out.append(name)
        host = urlsplit(str(rec.get("agent_url") or "")).hostname
        if host:
            out.append(host)
    return out


def forwarded(scope: Scope) -> bool:
    """Does the request say a follower forwarded it (``X-Kasou-Forwarded-For``/``-Sig``)?"""
    return any(k in (b"x-kasou-forwarded-for", b"x-kasou-forwarded-sig") for k, _v in scope.get("headers", []))


class KasouPeers:
    """ASGI middleware: a request over TLS (one that ``applies`` to, default all) from a peer that is not a
    kasou host is answered 403 with the reason; nothing behind it runs."""

    def __init__(
        self,
        app: ASGIApp,
        known_hosts: KnownHosts,
        applies: Callable[[Scope], bool] | None = None,
        what: str = "",
        revoked: Revoked | None = None,
    ) -> None:
        self.app = app
        self.known_hosts = known_hosts
        self.revoked = revoked
        self.applies = applies
        self.what = what  # e.g. "a forwarded call: "

    async def refusal(self, scope: Scope) -> str | None:
        peer = tls_peer(scope)
        if peer is None or (self.applies is not None and not self.applies(scope)):
            return None
        revoked = await self.revoked() if self.revoked is not None else set()
        if isinstance(peer, pki.Peer) and peer.serial in revoked:
            return (f"{self.what}the certificate {peer.subject} (serial {peer.serial:x}) was revoked: its host "
                    "left the cluster or was removed from it")  # fmt: skip
        if isinstance(peer, pki.Peer) and peer.kasou_host:
            return None  # the marker decides without asking the registry
        why = pki.peer_refusal(peer if isinstance(peer, pki.Peer) else None, await self.known_hosts())
        return None if why is None else self.what + why

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        why = await self.refusal(scope)
        if why is None:
            await self.app(scope, receive, send)
            return
        err = Forbidden(why)
        if scope["type"] == "websocket":  # refused before it is accepted: the client sees 403
            await send({"type": "websocket.close", "code": 1008, "reason": why[:120]})
            return
        body = json.dumps(error_body(err)).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": status_for(err), "headers": headers})
        await send({"type": "http.response.body", "body": body})
