"""The audit log's record format: keys, canonical JSON and hashes, redaction, the records, checkpoints
and verification reports, and the clock's state (no I/O but reading the clock)."""

from __future__ import annotations

import ctypes
import ctypes.util
import datetime as dt
import hashlib
import json
import re
import time
from typing import Any, Literal

from pydantic import BaseModel

PREFIX = "audit/"  # audit/<seq, 12 digits>: the records
CHECKPOINT_PREFIX = "audit-checkpoints/"  # audit-checkpoints/<seq>: signed (seq, hash)
HEAD_KEY = "audit-head"  # a hint where the log ended at the last checkpoint, and its interval (never trusted by verify)
SEQ_DIGITS = 12
LOCAL_SYSLOG = "/dev/log"
CHECKPOINT_MSG_ID = "audit-checkpoint"
GENESIS = "0" * 64  # the prev_hash of record 1
MAX_TRIES = 50  # appends that lose the race this often give up (each loss means another record went in)
DETAILS_MAX = 4096  # bytes of canonical JSON; larger details keep only their keys
TEXT_MAX = 500
REDACTED = "[redacted]"
_SECRET = re.compile(r"pass|token|ticket|cookie|secret|authori[sz]ation|session|csrf|credential|private|key$|^key|totp")


def seq_key(seq: int) -> str:
    return f"{PREFIX}{seq:0{SEQ_DIGITS}d}"


def checkpoint_key(seq: int) -> str:
    return f"{CHECKPOINT_PREFIX}{seq:0{SEQ_DIGITS}d}"


def canonical(value: dict[str, Any]) -> bytes:
    """The bytes a record's hash covers: sorted keys, no spaces, UTF-8; ``hash`` itself left out."""
    body = {k: v for k, v in value.items() if k != "hash"}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


def digest(value: dict[str, Any]) -> str:
    return hashlib.sha256(canonical(value)).hexdigest()


def redact(value: Any, depth: int = 0) -> Any:
    """A copy without secrets: values under secret-sounding keys replaced, long strings and lists cut."""
    if depth > 6:
        return "..."
    if isinstance(value, dict):
        out = {}
        for k, v in list(value.items())[:50]:
            ks = str(k)[:100]
            out[ks] = REDACTED if _SECRET.search(ks.lower()) else redact(v, depth + 1)
        return out
    if isinstance(value, list | tuple):
        return [redact(v, depth + 1) for v in list(value)[:50]]
    if isinstance(value, str):
        return value[:TEXT_MAX]
    if isinstance(value, float) and (value != value or value in (float("inf"), float("-inf"))):
        return str(value)
    if value is None or isinstance(value, bool | int | float):
        return value
    return str(value)[:TEXT_MAX]


def small_details(details: dict[str, Any] | None) -> dict[str, Any]:
    d = redact(details or {})
    if len(json.dumps(d, ensure_ascii=False)) > DETAILS_MAX:
        return {"truncated": True, "keys": sorted(d)[:50]}
    return d


# -- the record -------------------------------------------------------------------------------


class Actor(BaseModel):
    name: str
    role: str
    via: str  # token, session, or what a system actor is (ha)

    @classmethod
    def of(cls, who: Any) -> Actor | None:
        """From an Actor, a Principal (anything with name, role, via) or a dict; None stays None."""
        if who is None or isinstance(who, Actor):
            return who
        if isinstance(who, dict):
            return cls(name=str(who.get("name", "?")), role=str(who.get("role", "?")), via=str(who.get("via", "?")))
        role = getattr(who, "role", "?")
        return cls(name=str(who.name), role=str(getattr(role, "value", role)), via=str(getattr(who, "via", "?")))


SYSTEM_HA = Actor(name="kasou", role="system", via="ha")


class Result(BaseModel):
    ok: bool
    status: int | None = None  # the HTTP status, for requests
    code: str | None = None  # kasou's error code
    message: str = ""


class AuditRecord(BaseModel):
    seq: int
    time: str  # ISO 8601, UTC, microseconds
    host: str  # the host that wrote it (and whose clock ``time`` is)
    clock: str  # synced, unsynced or unknown: the kernel's view of that clock's synchronisation
    actor: Actor | None
    source: str  # the client's address ("" for the system)
    action: str  # "POST /v1/vms", or a named action: login, login_failed, lockout, console_open, ha_restart...
    target: str  # "vms/emr1", "users/bob", "hosts/h1"
    result: Result
    details: dict[str, Any]
    prev_hash: str
    hash: str


class Checkpoint(BaseModel):
    seq: int
    hash: str
    time: str
    host: str
    key_id: str
    public_key: str  # raw Ed25519 public key, base64 (informative: trust comes from the verifier's key files)
    signature: str  # base64 Ed25519 signature over keys.signed_message(seq, hash, every)
    every: int | None = None  # the writer's count interval from here on (signed; None in older checkpoints)


ProblemKind = Literal[
    "malformed",
    "deleted",
    "reordered",
    "edited",
    "truncated",
    "checkpoint_mismatch",
    "checkpoint_missing",
    "bad_signature",
    "unknown_key",
]


class Problem(BaseModel):
    kind: ProblemKind
    seq: int
    message: str


class VerifyReport(BaseModel):
    ok: bool
    records: int
    first_seq: int | None
    last_seq: int | None
    head_hash: str | None
    checkpoints: int
    last_checkpoint: int | None
    unsealed: int  # records after the last checkpoint (a truncation of those cannot be detected)
    problem: Problem | None
    anchor_file: str | None = None  # the file outside the store that the log was held against
    anchors: int = 0  # checkpoints anchored there
    last_anchor: int | None = None


# -- the clock --------------------------------------------------------------------------------

_clock_cache: tuple[float, str] = (-1e9, "unknown")


def clock_state() -> str:
    """``synced`` when the kernel says NTP keeps the clock synchronised (adjtimex), ``unsynced``, or ``unknown``."""
    global _clock_cache
    now = time.monotonic()
    if now - _clock_cache[0] < 60:
        return _clock_cache[1]
    state = "unknown"
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        buf = ctypes.create_string_buffer(512)  # struct timex with modes = 0: read only
        rc = libc.adjtimex(buf)
        if rc >= 0:
            state = "unsynced" if rc == 5 else "synced"  # TIME_ERROR: the clock is not synchronised
    except (OSError, AttributeError):
        pass
    _clock_cache = (now, state)
    return state


def utc_now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")
