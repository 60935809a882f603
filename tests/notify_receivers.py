"""Real receivers for notifications, each on 127.0.0.1 with a port of its own, stopped by the test that starts
it: a mail server (aiosmtpd), an HTTP webhook receiver that checks the signature and can fail its first
requests or never answer, and a syslog listener (UDP or TCP)."""

from __future__ import annotations

import hashlib
import hmac
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from email import message_from_bytes
from email.message import Message
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from aiosmtpd.controller import Controller


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(what: str, check: Callable[[], Any], timeout: float = 15.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


@dataclass
class Mail:
    mail_from: str
    rcpt_to: list[str]
    message: Message


@dataclass
class MailServer:
    port: int
    mails: list[Mail] = field(default_factory=list)

    def to(self, address: str) -> list[Mail]:
        return [m for m in self.mails if address in m.rcpt_to]


class _MailHandler:
    def __init__(self, server: MailServer) -> None:
        self.server = server

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.server.mails.append(
            Mail(envelope.mail_from, list(envelope.rcpt_tos), message_from_bytes(envelope.content))
        )
        return "250 OK"


@contextmanager
def mail_server() -> Iterator[MailServer]:
    """aiosmtpd on 127.0.0.1, stopped at the end."""
    server = MailServer(free_port())
    ctl = Controller(_MailHandler(server), hostname="127.0.0.1", port=server.port)
    ctl.start()
    try:
        yield server
    finally:
        ctl.stop()


@dataclass
class Hook:
    """What the webhook receiver got: every request, the good ones (signature checked) and how to answer."""

    url: str
    secret: str
    fail_first: int = 0  # answer 503 to this many requests first
    requests: list[dict[str, Any]] = field(default_factory=list)  # every attempt: headers and body
    accepted: list[dict[str, Any]] = field(default_factory=list)  # the bodies answered 200
    bad_signatures: int = 0

    def kinds(self) -> list[str]:
        return [b["event"]["kind"] for b in self.accepted]


@contextmanager
def webhook_receiver(secret: str, fail_first: int = 0) -> Iterator[Hook]:
    """An HTTP server in a thread that checks ``X-Kasou-Signature``; fails its first ``fail_first`` requests."""
    port = free_port()
    hook = Hook(f"http://127.0.0.1:{port}/hook", secret, fail_first)
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            with lock:
                hook.requests.append({"headers": dict(self.headers), "body": body})
                n = len(hook.requests)
            want = "sha256=" + hmac.new(hook.secret.encode(), body, hashlib.sha256).hexdigest()
            if not hmac.compare_digest(self.headers.get("X-Kasou-Signature", ""), want):
                hook.bad_signatures += 1
                self.send_response(401)
            elif n <= hook.fail_first:
                self.send_response(503)
            else:
                hook.accepted.append(json.loads(body))
                self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    t = threading.Thread(target=httpd.serve_forever, name="webhook-receiver", daemon=True)
    t.start()
    try:
        yield hook
    finally:
        httpd.shutdown()
        httpd.server_close()
        t.join(5)


@contextmanager
def silent_receiver() -> Iterator[str]:
    """A TCP port that takes connections into its backlog and never answers: a hung receiver."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(64)
    try:
        yield f"http://127.0.0.1:{s.getsockname()[1]}/hook"
    finally:
        s.close()


@contextmanager
def udp_syslog() -> Iterator[tuple[str, Callable[[float], list[bytes]]]]:
    """A UDP socket; yields the target ``udp://127.0.0.1:PORT`` and a function that reads what came."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))

    def read(timeout: float) -> list[bytes]:
        got: list[bytes] = []
        s.settimeout(timeout)
        while True:
            try:
                got.append(s.recv(65536))
            except TimeoutError:
                return got
            s.settimeout(0.2)

    try:
        yield f"udp://127.0.0.1:{s.getsockname()[1]}", read
    finally:
        s.close()
