"""How a notice leaves kasou: a mail over SMTP, a signed webhook, a syslog message (:mod:`kasou.control.notify`
decides who gets which).

Each sender's :meth:`send` either returns (delivered) or raises :class:`DeliveryFailed` with one line saying why;
every wait is bounded (``TIMEOUT_S`` per connection, a webhook's retries by their number and back-off), and the
blocking ones (SMTP, syslog sockets) run in a thread so the event loop never waits on a receiver.

* Mail: :mod:`smtplib`, optionally STARTTLS (the server's certificate verified with the system's CAs) and a
  log-in; one plain-text mail per notice to the channel's recipients.
* Webhook: ``POST`` of the notice's JSON with ``X-Kasou-Timestamp`` (Unix seconds) and, with a secret,
  ``X-Kasou-Signature: sha256=<hex HMAC-SHA256 of the body>``. The body carries the timestamp and a delivery
  id too, so a receiver can refuse a replay. Connection errors, timeouts, 429 and 5xx answers are tried
  again after ``backoff_s``, twice that, ... (``attempts`` in all); another 4xx is final.
* Syslog: one RFC 5424 message (message id ``event``, the notice's JSON as the message, the same line
  :func:`kasou.control.audit.syslog.rfc5424` makes for audit records) over UDP, over TCP with octet-counting
  framing (RFC 6587), or to the local syslog's ``/dev/log``.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import smtplib
import socket
import ssl
import time
from email.message import EmailMessage
from typing import Any
from urllib.parse import urlsplit

import httpx

from kasou.control.audit.syslog import rfc5424
from kasou.control.events import Severity
from kasou.errors import KasouError

TIMEOUT_S = 10.0  # one connection to a receiver (SMTP, webhook, syslog over TCP)
SIGNATURE_HEADER = "X-Kasou-Signature"
TIMESTAMP_HEADER = "X-Kasou-Timestamp"
LOCAL_SYSLOG = "/dev/log"
# RFC 5424 section 6.2.1: facility daemon (3); severities warning 4, error 3, critical 2, informational 6
SYSLOG_FACILITY = 3
SYSLOG_SEVERITY: dict[Severity, int] = {"info": 6, "warning": 4, "error": 3, "critical": 2}


class DeliveryFailed(KasouError):
    """A notice did not reach a receiver (the message says why, in one line)."""

    code = "delivery_failed"


def sign(secret: str, body: bytes) -> str:
    """The value of ``X-Kasou-Signature`` for ``body``: ``sha256=`` and the hex HMAC-SHA256 with ``secret``."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def _why(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return " ".join(f"{type(e).__name__}: {text}".split()) if text != type(e).__name__ else text


class MailSender:
    def __init__(
        self, host: str, port: int, mail_from: str, mail_to: list[str], starttls: bool = False,
        user: str | None = None, password: str | None = None,
    ) -> None:  # fmt: skip
        self.host, self.port, self.mail_from, self.mail_to = host, port, mail_from, list(mail_to)
        self.starttls, self.user, self.password = starttls, user, password

    @property
    def target(self) -> str:
        return f"{', '.join(self.mail_to)} via {self.host}:{self.port}"

    def message(self, notice: dict[str, Any]) -> EmailMessage:
        ev = notice["event"]
        dept = f" [{notice['department']}]" if notice.get("department") else ""
        test = "test: " if notice.get("test") else ""
        msg = EmailMessage()
        msg["From"] = self.mail_from
        msg["To"] = ", ".join(self.mail_to)
        msg["Subject"] = f"[kasou {ev['severity']}]{dept} {test}{ev['kind']} {ev['subject']}"[:200]
        when = time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(ev["time"]))
        lines = [
            ev["message"],
            "",
            f"severity:   {ev['severity']}",
            f"kind:       {ev['kind']}",
            f"subject:    {ev['subject']}",
            f"department: {notice.get('department') or '-'}",
            f"time:       {when}",
            f"reported by kasou on host {notice.get('host') or '-'}",
        ]
        msg.set_content("\n".join(lines) + "\n")
        return msg

    def _send(self, msg: EmailMessage) -> None:
        with smtplib.SMTP(self.host, self.port, timeout=TIMEOUT_S) as smtp:
            if self.starttls:
                smtp.starttls(context=ssl.create_default_context())
            if self.user:
                smtp.login(self.user, self.password or "")
            refused = smtp.send_message(msg)
        if refused:
            raise DeliveryFailed(f"the mail server refused {', '.join(sorted(refused))}")

    async def send(self, notice: dict[str, Any]) -> None:
        try:
            await asyncio.to_thread(self._send, self.message(notice))
        except DeliveryFailed:
            raise
        except (OSError, smtplib.SMTPException, ssl.SSLError) as e:
            raise DeliveryFailed(f"mail to {self.host}:{self.port} failed: {_why(e)}") from None


class WebhookSender:
    def __init__(self, url: str, secret: str | None, attempts: int = 5, backoff_s: float = 1.0) -> None:
        self.url, self.secret = url, secret
        self.attempts, self.backoff_s = max(1, attempts), backoff_s

    @property
    def target(self) -> str:
        u = urlsplit(self.url)  # a query or user part may hold a receiver's token: not shown
        return f"{u.scheme}://{u.hostname or ''}{f':{u.port}' if u.port else ''}{u.path}"

    def request(self, notice: dict[str, Any]) -> tuple[bytes, dict[str, str]]:
        """The body and headers of the notice's POST."""
        stamp = str(int(time.time()))
        body = json.dumps({**notice, "timestamp": int(stamp)}, sort_keys=True, separators=(",", ":")).encode()
        headers = {"Content-Type": "application/json", TIMESTAMP_HEADER: stamp, "User-Agent": "kasou-notify"}
        if self.secret:
            headers[SIGNATURE_HEADER] = sign(self.secret, body)
        return body, headers

    async def send(self, notice: dict[str, Any], attempts: int | None = None) -> None:
        body, headers = self.request(notice)
        tries = attempts or self.attempts
        why = ""
        async with httpx.AsyncClient(timeout=TIMEOUT_S, follow_redirects=False) as c:
            for n in range(tries):
                if n:
                    await asyncio.sleep(self.backoff_s * 2 ** (n - 1))
                try:
                    r = await c.post(self.url, content=body, headers=headers)
                except httpx.HTTPError as e:
                    why = _why(e)
                    continue
                if r.is_success:
                    return
                why = f"HTTP {r.status_code}"
                if r.status_code != 429 and r.status_code < 500:
                    break  # the receiver refuses this notice: another try would be refused the same
        raise DeliveryFailed(f"webhook {self.target} failed after {n + 1} attempt(s): {why}")


def parse_syslog(target: str) -> tuple[str, str | tuple[str, int]]:
    """``udp://host:port``, ``tcp://host:port`` or ``local`` → (transport, address); ValueError if neither."""
    if target == "local":
        return "unix", LOCAL_SYSLOG
    scheme, sep, rest = target.partition("://")
    host, colon, port = rest.rpartition(":")
    if not sep or scheme not in ("udp", "tcp") or not colon or not host or not port.isdigit():
        raise ValueError(f"{target!r} is not udp://HOST:PORT, tcp://HOST:PORT or local")
    if not 1 <= int(port) <= 65535:
        raise ValueError(f"{target!r}: the port must be 1 to 65535")
    return scheme, (host.strip("[]"), int(port))


class SyslogSender:
    def __init__(self, target: str) -> None:
        self.target = target
        self.transport, self.address = parse_syslog(target)

    def line(self, notice: dict[str, Any]) -> bytes:
        ev = notice["event"]
        pri = SYSLOG_FACILITY * 8 + SYSLOG_SEVERITY[ev["severity"]]
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ev["time"])) + f".{int(ev['time'] % 1 * 1e6):06d}Z"
        rec = {**notice, "time": stamp}
        return f"<{pri}>{rfc5424(rec, 'event')}".encode()

    def _send(self, data: bytes) -> None:
        if isinstance(self.address, str):  # local: the syslog daemon's socket
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
                s.settimeout(TIMEOUT_S)
                s.sendto(data, self.address)
            return
        host, port = self.address
        if self.transport == "udp":
            family = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)[0]
            with socket.socket(family[0], socket.SOCK_DGRAM) as s:
                s.settimeout(TIMEOUT_S)
                s.sendto(data, family[4])
            return
        with socket.create_connection((host, port), timeout=TIMEOUT_S) as s:
            s.sendall(f"{len(data)} ".encode() + data)  # RFC 6587 octet counting

    async def send(self, notice: dict[str, Any]) -> None:
        try:
            await asyncio.to_thread(self._send, self.line(notice))
        except OSError as e:
            raise DeliveryFailed(f"syslog to {self.target} failed: {_why(e)}") from None
