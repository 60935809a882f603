"""The uvicorn plumbing every kasou process shares (the host agent's, its guard's, the API's): logging,
TLS and proxy settings, the agent's unix socket. It imports nothing of the layers above the
configuration, so both :mod:`kasou.agent.server` and :mod:`kasou.api.server` may use it."""

from __future__ import annotations

import ipaddress
import logging
import os
import socket
import ssl
from typing import Any

import uvicorn

from kasou import peers
from kasou.config import TlsFiles, trusted_proxies
from kasou.pki import host_client_context, server_context


def log_to_stderr(name: str) -> None:
    """Log at INFO, each line naming the process (``agent``, ``guard``, ``api``)."""
    logging.basicConfig(
        level=logging.INFO,
        format=f"%(asctime)s {name} %(levelname)s %(name)s: %(message)s",
    )
    # httpx logs every request at INFO: each store read and agent call of the control plane, several a second
    for chatty in ("httpx", "httpcore"):
        logging.getLogger(chatty).setLevel(logging.WARNING)


def tls_config(files: TlsFiles, client_certs: str) -> dict[str, Any]:
    """uvicorn's settings to serve HTTPS with this host's certificate (client certificates:
    ``required`` for agents, ``optional`` for the API, which also serves people's browsers)."""
    ctx = server_context(files, client_certs)

    def factory(_config: uvicorn.Config, _default: Any) -> ssl.SSLContext:
        return ctx

    return {"ssl_context_factory": factory, **peers.uvicorn_options()}  # the client certificate reaches the app


def uvicorn_settings() -> dict[str, Any]:
    """uvicorn's proxy settings for every server kasou runs. uvicorn believes ``X-Forwarded-For`` (and
    ``-Proto``) from 127.0.0.1 by default, so anyone on the host could name any client address, the one
    the audit log records: kasou believes it from nobody, unless ``KASOU_TRUSTED_PROXIES`` lists the
    addresses or networks of reverse proxies in front of the API (comma-separated). Between kasou's own
    hosts the client's address travels signed (``X-Kasou-Forwarded-For``, :mod:`kasou.api.audit`)."""
    proxies = trusted_proxies()
    if not proxies:
        return {"proxy_headers": False}
    return {"proxy_headers": True, "forwarded_allow_ips": proxies}


def serve_unix(app: Any, path: str) -> None:
    """Serve ``app`` on the unix socket ``path``, connectable by its owner (root) only: mode 0600 from the
    bind on, since the socket's mode is all the authentication the agent has there. (uvicorn binding it
    itself would chmod it 0666.)"""
    if os.path.exists(path):
        os.unlink(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        sock.bind(path)
    finally:
        os.umask(old)
    os.chmod(path, 0o600)
    config = uvicorn.Config(app, uds=path, log_level="warning", **uvicorn_settings())
    try:
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        sock.close()


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def url_host(host: str) -> str:
    """``host`` as it goes in a URL (an IPv6 address in brackets)."""
    return f"[{host}]" if ":" in host else host


def etcd_tls(files: TlsFiles, endpoints: list[str], ctx: ssl.SSLContext | None = None) -> ssl.SSLContext | None:
    """This host's client context for etcd on ``https://`` (the site CA, its certificate), else None;
    ``ctx``: that context made already (the control plane's, for agents and the leader)."""
    if not any(e.startswith("https://") for e in endpoints):
        return None
    return ctx or host_client_context(files)
