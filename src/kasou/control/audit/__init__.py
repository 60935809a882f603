"""The tamper-evident audit log: who did what, to what, when, from where, with what result.

Records live in the store under ``audit/<seq>`` (12 digits), each holding the SHA-256 of the previous
one, so an edited, deleted or reordered record breaks the chain at that point; every
``KASOU_AUDIT_CHECKPOINT_EVERY`` records (100) or ``KASOU_AUDIT_CHECKPOINT_MINUTES`` (10) an Ed25519
signature over (seq, hash, interval) is stored under ``audit-checkpoints/<seq>`` and anchored outside the
store (an append-only file, syslog: :mod:`kasou.control.audit.anchors`), which ``verify`` holds the store
against. ``docs/audit.md`` has the format and what an attacker with the store, the key or both can do.

What is recorded: every state-changing API request (POST, PUT, PATCH, DELETE under ``/v1``, also those
refused), sign-in, failed sign-in, lock-out, HA actions, console sessions. Reads are not recorded.

For other parts of kasou (the console proxy, HA), one call that never raises::

    await audit.record(
        store,                      # the cluster store (Services.store)
        "console_open",             # the action: console_open, console_close, ha_restart, ...
        actor=principal,            # a Principal (name, role, via), an audit.Actor, a dict, or None
        source="10.1.2.3",          # the client's address ("" for the system)
        target="vms/emr1",          # what it acts on: vms/NAME, hosts/NAME, users/NAME, pools/NAME
        ok=True,                    # the result; with status (HTTP), code and message for a failure
        details={"session": ...},   # small; secret-sounding keys (password, token, ticket, cookie...) are redacted
    ) -> AuditRecord | None         # None if the record could not be written (logged and counted)
"""

from __future__ import annotations

import logging
import weakref
from typing import Any

from kasou.control.audit.chain import AuditLog
from kasou.control.audit.records import (
    CHECKPOINT_PREFIX,
    PREFIX,
    SYSTEM_HA,
    Actor,
    AuditRecord,
    Checkpoint,
    Problem,
    Result,
    VerifyReport,
    redact,
)
from kasou.control.audit.verify import verify_entries
from kasou.store.base import Store

__all__ = [
    "CHECKPOINT_PREFIX",
    "PREFIX",
    "SYSTEM_HA",
    "Actor",
    "AuditLog",
    "AuditRecord",
    "Checkpoint",
    "Problem",
    "Result",
    "VerifyReport",
    "for_store",
    "record",
    "redact",
    "verify_entries",
]

log = logging.getLogger(__name__)

_logs: weakref.WeakKeyDictionary[Store, AuditLog] = weakref.WeakKeyDictionary()


def for_store(store: Store) -> AuditLog:
    """The one AuditLog of ``store`` in this process (settings from the environment)."""
    a = _logs.get(store)
    if a is None:
        a = _logs[store] = AuditLog(store)
    return a


async def record(
    store: Store,
    action: str,
    *,
    actor: Any = None,
    source: str = "",
    target: str = "",
    ok: bool = True,
    status: int | None = None,
    code: str | None = None,
    message: str = "",
    details: dict[str, Any] | None = None,
) -> AuditRecord | None:
    """Append one record; never raises (a failure is logged, counted in ``for_store(store).stats``)."""
    try:
        return await for_store(store).append(
            action, actor=actor, source=source, target=target, ok=ok, status=status, code=code, message=message,
            details=details,
        )  # fmt: skip
    except Exception as e:
        log.error("could not write the audit record %s %s: %s", action, target, e)
        return None
