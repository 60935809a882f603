"""Certificates that will expire are events: the site CA (every certificate of the bundle ``KASOU_CA`` names),
this host's certificate, and the certificate the site's backup server presents.

A certificate with ``WARN_DAYS`` (30) days or fewer left raises ``certificate_expiring`` (warning); with
``ERROR_DAYS`` (7) or fewer, once more as an error; each once (:meth:`Events.raise_once`, one key per
certificate and level). When the certificate is renewed (more than 30 days left, or the CA's certificate gone
from the bundle) the condition is cleared with an info event ``certificate_renewed``. Every API server checks
its own files every ``CHECK_EVERY_S`` and at start.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import logging
import ssl
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from cryptography import x509

from kasou.config import TlsFiles, host_name
from kasou.control.background import BackgroundTask
from kasou.control.events import Events, Severity
from kasou.control.offsite import KEY as BACKUP_SERVER_KEY
from kasou.control.offsite import OffsiteRecord
from kasou.pki import RENEW_WARN_DAYS
from kasou.store.base import Store

log = logging.getLogger(__name__)

WARN_DAYS = RENEW_WARN_DAYS  # 30
ERROR_DAYS = 7
CHECK_EVERY_S = 6 * 3600.0
ASK_S = 10.0  # how long the backup server has to present its certificate
KIND = "certificate_expiring"
RENEWED_KIND = "certificate_renewed"
PREFIX = "cert/"


@dataclass(frozen=True)
class Watched:
    key: str  # the condition's key (under cert/), one per certificate
    subject: str  # the event's subject: site, host/NAME, backup-server
    what: str  # for the message: "the site CA CN=...", "host h1's certificate"
    not_after: dt.datetime


def _bundle(path: Path) -> list[x509.Certificate]:
    try:
        return x509.load_pem_x509_certificates(path.read_bytes())
    except (OSError, ValueError):
        return []


def _host_cert(path: Path) -> x509.Certificate | None:
    certs = _bundle(path)
    return certs[0] if certs else None


def days_left(not_after: dt.datetime, now: dt.datetime | None = None) -> float:
    return (not_after - (now or dt.datetime.now(dt.UTC))).total_seconds() / 86400


def level(left: float) -> Severity | None:
    """The severity of a certificate with ``left`` days: error, warning, or None (not yet)."""
    if left <= ERROR_DAYS:
        return "error"
    if left <= WARN_DAYS:
        return "warning"
    return None


class CertWatch:
    def __init__(self, store: Store, files: TlsFiles | None, host: str | None = None) -> None:
        self.store = store
        self.files = files
        self.host = host or host_name()
        self.events = Events(store)
        self._background = BackgroundTask("certificate-check")

    def local(self) -> list[Watched]:
        """This host's certificates: the CA bundle's and its own."""
        out: list[Watched] = []
        if self.files is None:
            return out
        for cert in _bundle(self.files.ca):
            name = cert.subject.rfc4514_string()
            ident = hashlib.sha256(cert.subject.public_bytes()).hexdigest()[:16]
            out.append(Watched(f"{PREFIX}ca/{ident}", "site", f"the site CA {name} ({self.files.ca})",
                               cert.not_valid_after_utc))  # fmt: skip
        own = _host_cert(self.files.cert)
        if own is not None:
            what = f"host {self.host}'s certificate ({self.files.cert})"
            out.append(Watched(f"{PREFIX}host/{self.host}", f"host/{self.host}", what, own.not_valid_after_utc))
        return out

    async def backup_server(self) -> Watched | None:
        """The certificate the site's backup server presents (None: no https server set, or no answer)."""
        entry = await self.store.get(BACKUP_SERVER_KEY)
        if entry is None:
            return None
        rec = OffsiteRecord.model_validate(entry.value)
        url = urlsplit(rec.url)
        if url.scheme != "https" or not url.hostname or rec.isolated:
            return None
        try:
            pem = await asyncio.to_thread(ssl.get_server_certificate, (url.hostname, url.port or 443), timeout=ASK_S)
            cert = x509.load_pem_x509_certificate(pem.encode())
        except (OSError, ssl.SSLError, ValueError) as e:
            log.info("the backup server's certificate could not be read: %s", e)
            return None
        return Watched(f"{PREFIX}backup-server", "backup-server", f"the backup server's certificate ({rec.url})",
                       cert.not_valid_after_utc)  # fmt: skip

    async def check(self) -> list[str]:
        """Raise or clear the condition of each certificate; the keys raised now."""
        watched = self.local()
        remote = await self.backup_server()
        if remote is not None:
            watched.append(remote)
        raised = []
        for w in watched:
            left = days_left(w.not_after)
            sev = level(left)
            when = f"{w.not_after:%Y-%m-%d}"
            if sev is None:
                await self.events.clear(w.key + "/error")
                await self.events.clear(w.key + "/warning", RENEWED_KIND, f"{w.what} is renewed: valid until {when}")
                continue
            state = f"expired on {when}" if left < 0 else f"expires on {when}, in {max(0, int(left))} days"
            message = f"{w.what} {state}; renew it (kasou tls renew, docs/security.md)"
            await self.events.raise_once(w.key + "/warning", KIND, w.subject, message, "warning")
            raised.append(w.key + "/warning")
            if sev == "error":
                await self.events.raise_once(w.key + "/error", KIND, w.subject, message, "error")
                raised.append(w.key + "/error")
        # a CA certificate that left the bundle was replaced: its conditions are over
        present = {w.key for w in watched}
        for key in await self.events.active_keys(PREFIX + "ca/"):
            base = key.rsplit("/", 1)[0]
            if base not in present:
                await self.events.clear(key, RENEWED_KIND if key.endswith("/warning") else None,
                                        "a CA certificate that was expiring is no longer in the bundle")  # fmt: skip
        return raised

    async def _loop(self, every: float) -> None:
        while True:
            try:
                await self.check()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("certificate check failed")
            await asyncio.sleep(every)

    def start(self, every: float = CHECK_EVERY_S) -> None:
        self._background.start(lambda: self._loop(every))

    async def close(self) -> None:
        await self._background.close()
