"""QEMU's TLS credentials for the streams between hosts: live migration and NBD (copied and replicated disks).

A host with TLS files (:meth:`kasou.config.Paths.tls_files`: the site CA, the host's
certificate and key, ECDSA P-256 from :mod:`kasou.pki`) gives its QEMU processes and
``qemu-storage-daemon`` a ``tls-creds-x509`` object that reads a directory in QEMU's layout,
built from those files by :func:`prepare` in the host's runtime directory::

    <run>/qemu-tls/            mode 0700
      ca-cert.pem              the site CA (the trust anchor)
      server-cert.pem          this host's certificate (it is both server and client)
      server-key.pem           mode 0600
      client-cert.pem
      client-key.pem           mode 0600

The side that listens (the destination's ``migrate-incoming`` and NBD server, the replica's
daemon) uses ``endpoint=server``, the side that connects ``endpoint=client``; both with
``verify-peer``, so each refuses a peer without a certificate of the site CA, and the client
checks that the server's certificate names the address it connects to (``tls-hostname``).
Checked with QEMU 7.2 (gnutls): ECDSA keys load, an NBD client without a certificate, without
TLS or with another host name is refused.

A host without TLS files keeps plain TCP (one host with ``kasou up``); a host with them never
sends or accepts these streams in plain TCP.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

from kasou.config import TlsFiles
from kasou.errors import HypervisorError, MonitorError
from kasou.hypervisor.qemu.migration import Execute

#: The ids of the credential objects in a QEMU process (or storage daemon).
SERVER_ID = "kasou-tls-server"
CLIENT_ID = "kasou-tls-client"
DIR_NAME = "qemu-tls"


def available(files: TlsFiles) -> bool:
    """True when this host has all of its TLS files."""
    return all(p.is_file() for p in (files.ca, files.cert, files.key))


def _write(path: Path, data: bytes, mode: int) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(tmp, mode)
    os.replace(tmp, path)


def prepare(files: TlsFiles, run_dir: Path) -> Path | None:
    """Build QEMU's credentials directory from this host's TLS files; None when the host has none.

    Copies, not links: the directory (0700) and its keys (0600) are root's alone whatever the
    modes of the originals, and a certificate renewed later is taken at the next agent start.
    """
    if not available(files):
        return None
    d = run_dir / DIR_NAME
    d.mkdir(parents=True, exist_ok=True)
    os.chmod(d, 0o700)
    ca, cert, key = files.ca.read_bytes(), files.cert.read_bytes(), files.key.read_bytes()
    _write(d / "ca-cert.pem", ca, 0o644)
    for role in ("server", "client"):
        _write(d / f"{role}-cert.pem", cert, 0o644)
        _write(d / f"{role}-key.pem", key, 0o600)
    return d


def creds_object(endpoint: str, directory: Path) -> dict[str, Any]:
    """The ``object-add`` arguments of the credentials for ``endpoint`` (``server`` or ``client``)."""
    return {
        "qom-type": "tls-creds-x509",
        "id": SERVER_ID if endpoint == "server" else CLIENT_ID,
        "endpoint": endpoint,
        "dir": str(directory),
        "verify-peer": True,
    }


def qsd_object(directory: Path) -> str:
    """The storage daemon's ``--object`` for its NBD server (``,`` in the path doubled)."""
    return f"tls-creds-x509,id={SERVER_ID},endpoint=server,dir={str(directory).replace(',', ',,')},verify-peer=on"


async def ensure_creds(execute: Execute, endpoint: str, directory: Path) -> str:
    """Give a QEMU the credentials object as the files are now; returns its id.

    QEMU reads the files once, when the object is made: one left from an earlier migration or
    attach is deleted and made again (a certificate renewed since, a new CA). An NBD server,
    client or migration channel that holds the old one keeps it (QEMU counts references) until
    it ends; if QEMU refuses the delete, the old one is used."""
    args = creds_object(endpoint, directory)
    oid = str(args["id"])

    async def present() -> bool:
        objects = await execute("qom-list", {"path": "/objects"})
        return any(o.get("name") == oid for o in objects or [])

    if await present():
        with contextlib.suppress(MonitorError):  # "in use": keep it
            await execute("object-del", {"id": oid})
        if await present():
            return oid
    try:
        await execute("object-add", args)
    except MonitorError as e:
        if not await present():  # not a duplicate added meanwhile: the files do not load
            raise HypervisorError(f"QEMU cannot load this host's TLS files from {directory}: {e}") from None
    return oid


def uri_host(uri: str) -> str:
    """The host of a ``tcp:HOST:PORT`` migration URI (an IPv6 literal without its brackets)."""
    rest = uri.split(":", 1)[1] if uri.startswith("tcp:") else uri
    host = rest.rpartition(":")[0]
    return host[1:-1] if host.startswith("[") and host.endswith("]") else host
