"""TLS contexts from a host's certificate files, with nothing but :mod:`ssl`: what every client and server of
kasou needs at start (the CLI verifying the API, an agent serving), without loading :mod:`cryptography` as
:mod:`kasou.pki` (which makes and reads certificates) does. :mod:`kasou.pki` exports these too."""

from __future__ import annotations

import ssl
from pathlib import Path

from kasou.config import TlsFiles
from kasou.errors import KasouError


class TlsError(KasouError):
    """A certificate or key is missing, unreadable or does not fit."""


def require(files: TlsFiles, what: str) -> TlsFiles:
    """The files, or a one-line error saying how to make them."""
    missing = [str(p) for p in (files.ca, files.cert, files.key) if not p.is_file()]
    if missing:
        raise TlsError(
            f"{what} needs this host's certificate; missing {', '.join(missing)} "
            "(make them with `kasou tls init` or `kasou tls issue`, or set KASOU_CA, KASOU_TLS_CERT, KASOU_TLS_KEY)"
        )
    return files


def client_context(ca: Path, cert: Path | None = None, key: Path | None = None) -> ssl.SSLContext:
    """A client context that trusts only ``ca`` (the site CA or the hospital's bundle) and
    verifies host names; with ``cert``/``key`` it presents them (mutual TLS)."""
    try:
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca))
        if cert is not None and key is not None:
            ctx.load_cert_chain(str(cert), str(key))
    except (OSError, ssl.SSLError) as e:
        raise TlsError(f"cannot use the TLS files ({ca}, {cert}): {e}") from None
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


def host_client_context(files: TlsFiles) -> ssl.SSLContext:
    """This host's client context for agents and other API servers: the site CA, its own certificate."""
    require(files, "calling other hosts over TCP")
    return client_context(files.ca, files.cert, files.key)


def server_context(files: TlsFiles, client_certs: str = "required") -> ssl.SSLContext:
    """A server context with this host's certificate; ``client_certs``: required, optional or none."""
    require(files, "serving over TCP")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(str(files.cert), str(files.key))
        ctx.load_verify_locations(cafile=str(files.ca))
    except (OSError, ssl.SSLError) as e:
        raise TlsError(f"cannot use the TLS files ({files.cert}, {files.key}): {e}") from None
    ctx.verify_mode = {"required": ssl.CERT_REQUIRED, "optional": ssl.CERT_OPTIONAL}.get(client_certs, ssl.CERT_NONE)
    return ctx


def trust(files: TlsFiles) -> ssl.SSLContext | bool:
    """What a client of the API verifies its server with: the site CA (or the hospital's bundle) when
    there is one, else the system's trusted CAs. Never nothing."""
    return client_context(files.ca) if files.ca.is_file() else True
