"""Forwarding audit records to syslog (``KASOU_AUDIT_SYSLOG=host:port`` over UDP, or a socket path such as
``/dev/log``), one RFC 5424 line per record whose message is the record's JSON (message id ``audit``);
signed checkpoints the same way with the message id ``audit-checkpoint``.

Sending never blocks the API: the socket is non-blocking and a record that cannot be sent is dropped and
counted (the store keeps it; ``kasou audit export`` can resend the whole log).
"""

from __future__ import annotations

import json
import logging
import logging.handlers
import os
import socket
from typing import Any

log = logging.getLogger(__name__)

APP_NAME = "kasou"
MSG_ID = "audit"


class _Handler(logging.handlers.SysLogHandler):
    def __init__(self, address: str | tuple[str, int]) -> None:
        super().__init__(address=address, facility=logging.handlers.SysLogHandler.LOG_AUTHPRIV,
                         socktype=socket.SOCK_DGRAM)  # fmt: skip
        self.append_nul = False
        self.last_error: str | None = None
        getattr(self, "socket").setblocking(False)  # noqa: B009 - typeshed lacks it

    def handleError(self, record: logging.LogRecord) -> None:
        import sys

        e = sys.exc_info()[1]
        self.last_error = f"{type(e).__name__}: {e}" if e is not None else "unknown error"


def parse_target(target: str) -> str | tuple[str, int]:
    """``host:port`` (UDP) or an absolute socket path."""
    if target.startswith("/"):
        return target
    host, sep, port = target.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"KASOU_AUDIT_SYSLOG must be host:port or a socket path, not {target!r}")
    return host.strip("[]"), int(port)


def rfc5424(rec: dict[str, Any], msg_id: str = MSG_ID) -> str:
    """The part after ``<PRI>``: version, time, host, app, process id, message id, no structured data, the JSON."""
    body = json.dumps(rec, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return f"1 {rec.get('time', '-')} {rec.get('host') or '-'} {APP_NAME} {os.getpid()} {msg_id} - {body}"


class SyslogForwarder:
    def __init__(self, target: str) -> None:
        self.target = target
        self.address = parse_target(target)
        self.sent = 0
        self.failures = 0
        self.last_error: str | None = None
        self._handler: _Handler | None = None

    def _open(self) -> _Handler:
        if self._handler is None:
            self._handler = _Handler(self.address)
        return self._handler

    def send(self, rec: dict[str, Any], msg_id: str = MSG_ID) -> bool:
        """Send one record (or checkpoint: ``msg_id`` audit-checkpoint); False (and counted) if it could not be sent."""
        outcome = rec.get("result") or {}
        level = logging.INFO if outcome.get("ok", True) else logging.WARNING
        try:
            h = self._open()
            h.last_error = None
            lr = logging.LogRecord("kasou.audit", level, __file__, 0, rfc5424(rec, msg_id), None, None)
            h.emit(lr)
            err = h.last_error
        except OSError as e:
            err = f"{type(e).__name__}: {e}"
            self.close()
        if err is not None:
            self.failures += 1
            self.last_error = err
            return False
        self.sent += 1
        return True

    def close(self) -> None:
        if self._handler is not None:
            self._handler.close()
            self._handler = None
