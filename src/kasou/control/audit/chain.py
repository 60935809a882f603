"""The audit log itself: hash-chained records in the store, signed checkpoints, verification."""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import datetime as dt
import hashlib
import json
import logging
import os
import re
import time
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel

from kasou.config import host_name
from kasou.control.audit import anchors, keys
from kasou.control.audit.syslog import SyslogForwarder
from kasou.errors import StoreConflict, StoreError
from kasou.store.base import Store

log = logging.getLogger(__name__)

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


# -- the log ----------------------------------------------------------------------------------


def _setting(name: str, default: float) -> float:
    try:
        return float(os.environ.get(name, default))
    except ValueError:
        return default


class AuditLog:
    """One store's audit log. Appends are serialised in this process and compare-and-swapped in the store."""

    def __init__(
        self,
        store: Store,
        key_path: Path | None = None,
        host: str | None = None,
        checkpoint_every: int | None = None,
        checkpoint_minutes: float | None = None,
        syslog: str | None = None,
        anchor_path: Path | None = None,
    ) -> None:
        self.store = store
        self.key_path = key_path or keys.default_key_path(store)
        self.anchor_path = anchor_path or anchors.default_anchor_path(store)
        self.host = host or host_name()
        self.checkpoint_every = max(1, int(checkpoint_every or _setting("KASOU_AUDIT_CHECKPOINT_EVERY", 100)))
        self.checkpoint_s = 60 * (checkpoint_minutes or _setting("KASOU_AUDIT_CHECKPOINT_MINUTES", 10))
        target = syslog if syslog is not None else os.environ.get("KASOU_AUDIT_SYSLOG", "")
        self.syslog = SyslogForwarder(target) if target else None
        # Checkpoints go to syslog too: the configured one, else the host's own (/dev/log) if it has one.
        local = not target and os.path.exists(LOCAL_SYSLOG)
        self.checkpoint_syslog = self.syslog or (SyslogForwarder(LOCAL_SYSLOG) if local else None)
        self._syslog_raised = False
        self._anchor_raised = False
        self._lock = asyncio.Lock()
        self._head: tuple[int, str] | None = None  # (seq, hash) of the last record this process knows
        self._declared = False  # whether this process has checked that the log knows its interval
        self._last_checkpoint = time.monotonic()
        self._key: Any = None
        self.stats = {"appended": 0, "conflicts": 0, "failures": 0, "checkpoints": 0, "checkpoint_failures": 0,
                      "anchor_failures": 0}  # fmt: skip

    # -- appending --

    async def _find_head(self) -> tuple[int, str]:
        """The last record: from the hint (checked), else a scan; then forward while later records exist."""
        head: tuple[int, str] | None = self._head
        if head is None:
            hint = await self.store.get(HEAD_KEY)
            if hint is not None:
                seq = int(hint.value.get("seq", 0))
                e = await self.store.get(seq_key(seq))
                if e is not None and e.value.get("hash") == hint.value.get("hash"):
                    head = (seq, str(e.value["hash"]))
            if head is None:
                entries = await self.store.range(PREFIX)
                head = (int(entries[-1].key[len(PREFIX) :]), str(entries[-1].value.get("hash"))) if entries else None
            head = head or (0, GENESIS)
        return await self._forward(head)

    async def _forward(self, head: tuple[int, str]) -> tuple[int, str]:
        seq, h = head
        while True:
            e = await self.store.get(seq_key(seq + 1))
            if e is None:
                return seq, h
            seq, h = seq + 1, str(e.value.get("hash"))

    async def append(
        self,
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
    ) -> AuditRecord:
        """Append one record; StoreError if the store refuses or the race is lost ``MAX_TRIES`` times."""
        result = Result(ok=ok, status=status, code=code, message=message[:TEXT_MAX])
        a = Actor.of(actor)
        body: dict[str, Any] = {
            "host": self.host, "clock": clock_state(), "actor": a.model_dump() if a else None,
            "source": source[:200], "action": action[:300], "target": target[:300],
            "result": result.model_dump(), "details": small_details(details),
        }  # fmt: skip
        async with self._lock:
            head = self._head or await self._find_head()
            for _ in range(MAX_TRIES):
                seq, prev = head
                value = {**body, "seq": seq + 1, "time": utc_now(), "prev_hash": prev}
                value["hash"] = digest(value)
                try:
                    await self.store.create(seq_key(seq + 1), value)
                except StoreConflict:  # another API server appended first: follow the chain and try again
                    self.stats["conflicts"] += 1
                    head = await self._forward(head)
                    continue
                except BaseException:
                    self._head = None
                    self.stats["failures"] += 1
                    raise
                self._head = (seq + 1, value["hash"])
                self.stats["appended"] += 1
                break
            else:
                self._head = None
                self.stats["failures"] += 1
                raise StoreError(f"could not append to the audit log: {MAX_TRIES} other records went in first")
            new = seq + 1
            seal = new % self.checkpoint_every == 0 or time.monotonic() - self._last_checkpoint >= self.checkpoint_s
            if not self._declared:
                seal = await self._interval_changed(new) or seal
            if seal:
                await self._checkpoint_quietly(new, value["hash"])
            elif new % self.checkpoint_every == 1 and new > 1:
                await self._repair_quietly(new - 1, prev)
        rec = AuditRecord.model_validate(value)
        if self.syslog is not None:
            await self._forward_syslog(value)
        return rec

    async def _interval_changed(self, seq: int) -> bool:
        """Once a process: whether the log's last checkpoint declared another interval than this writer keeps
        (or none), so that record ``seq`` is sealed at once, declaring this one: verify then asks for a
        checkpoint at every multiple of the interval declared before each stretch of the log."""
        self._declared = True
        try:
            hint = await self.store.get(HEAD_KEY)
        except StoreError:
            return False
        if hint is None:
            return False  # no checkpoint yet: the first one declares the interval for the records before it too
        return bool(hint.value.get("every") != self.checkpoint_every)  # also one made before intervals were declared

    async def _repair_quietly(self, seq: int, h: str) -> None:
        """The checkpoint at ``seq`` (a multiple of the interval) if it is missing: its writer failed or
        died between the record and its checkpoint."""
        try:
            if await self.store.get(checkpoint_key(seq)) is None:
                log.warning("the audit checkpoint at %d is missing: writing it now", seq)
                await self._write_checkpoint(seq, h)
        except Exception as e:
            self.stats["checkpoint_failures"] += 1
            log.error("audit checkpoint at %d failed: %s", seq, e)

    async def _checkpoint_quietly(self, seq: int, h: str) -> None:
        try:
            await self._write_checkpoint(seq, h)
        except Exception as e:  # a checkpoint that fails leaves the records intact; the next one covers them
            self.stats["checkpoint_failures"] += 1
            log.error("audit checkpoint at %d failed: %s", seq, e)

    async def _write_checkpoint(self, seq: int, h: str) -> Checkpoint:
        if self._key is None:
            self._key = await asyncio.to_thread(keys.load_or_create, self.key_path)
        pub = self._key.public_key()
        every = self.checkpoint_every
        cp = Checkpoint(seq=seq, hash=h, time=utc_now(), host=self.host, key_id=keys.key_id(pub),
                        public_key=keys.public_b64(pub), signature=keys.sign(self._key, seq, h, every),
                        every=every)  # fmt: skip
        try:
            await self.store.create(checkpoint_key(seq), cp.model_dump())
        except StoreConflict:  # another server sealed the same record (and anchored it)
            pass
        else:
            await self._anchor(cp)
        await self.store.put(HEAD_KEY, {"seq": seq, "hash": h, "every": every})
        self._last_checkpoint = time.monotonic()
        self.stats["checkpoints"] += 1
        return cp

    async def _anchor(self, cp: Checkpoint) -> None:
        """The checkpoint outside the store: a line in the anchor file, a message to syslog. A failure is
        logged, counted and raised as an event; the checkpoint in the store stands."""
        value = cp.model_dump()
        if self.checkpoint_syslog is not None:
            self.checkpoint_syslog.send({**value, "action": "audit_checkpoint"}, msg_id=CHECKPOINT_MSG_ID)
        try:
            await asyncio.to_thread(anchors.append, self.anchor_path, value)
        except OSError as e:
            self.stats["anchor_failures"] += 1
            log.error("could not anchor the audit checkpoint %d in %s: %s", cp.seq, self.anchor_path, e)
            self._anchor_raised = True
            await self._raise_quietly(
                "audit-anchor", "audit_anchor_failed", "audit/anchor",
                f"audit checkpoint {cp.seq} could not be written to the anchor file {self.anchor_path} "
                f"({self.stats['anchor_failures']} so far; it stays in the store): {e}",
            )  # fmt: skip
            return
        if self._anchor_raised:
            self._anchor_raised = False
            again = f"audit checkpoints reach {self.anchor_path} again"
            await self._raise_quietly("audit-anchor", "audit_anchor_ok", again)

    async def _raise_quietly(self, key: str, kind: str, target_or_message: str, message: str | None = None) -> None:
        """An operator event (raised once), or with no ``message`` the clearing of it; never raises."""
        from kasou.control.events import Events

        ev = Events(self.store)
        try:
            if message is None:
                await ev.clear(key, kind, target_or_message)
            else:
                await ev.clear(key)
                await ev.raise_once(key, kind, target_or_message, message)
        except Exception as e:
            log.error("could not note %s as an event: %s", kind, e)

    async def checkpoint(self) -> Checkpoint | None:
        """Seal the log as it is now (None if it is empty)."""
        async with self._lock:
            self._head = await self._find_head()
            seq, h = self._head
            if seq == 0:
                return None
            existing = await self.store.get(checkpoint_key(seq))
            if existing is not None:
                return Checkpoint.model_validate(existing.value)
            return await self._write_checkpoint(seq, h)

    async def _forward_syslog(self, value: dict[str, Any]) -> None:
        assert self.syslog is not None
        ok = self.syslog.send(value)
        if ok and self._syslog_raised:
            self._syslog_raised = False
            await self._event_quietly(clear=True)
        elif not ok and (not self._syslog_raised or self.syslog.failures % 100 == 0):
            self._syslog_raised = True
            await self._event_quietly(clear=False)

    async def _event_quietly(self, clear: bool) -> None:
        assert self.syslog is not None
        if clear:
            await self._raise_quietly("audit-syslog", "audit_syslog_ok",
                                      f"audit records reach syslog {self.syslog.target} again")  # fmt: skip
        else:
            await self._raise_quietly(
                "audit-syslog", "audit_syslog_failed", "audit/syslog",
                f"audit records could not be sent to syslog {self.syslog.target} "
                f"({self.syslog.failures} so far; they stay in the store): {self.syslog.last_error}",
            )  # fmt: skip

    # -- reading --

    async def records(
        self,
        since: str | None = None,
        actor: str | None = None,
        target: str | None = None,
        action: str | None = None,
        limit: int | None = None,
    ) -> list[dict[str, Any]]:
        """Records in order, filtered: ``since`` an ISO time (UTC if no zone), ``actor`` a user name,
        ``target`` the target or a prefix of it, ``action`` a part of the action; the last ``limit``."""
        since_ts = parse_time(since) if since else None
        out = []
        for e in await self.store.range(PREFIX):
            v = e.value
            if since_ts is not None and parse_time(str(v.get("time", ""))) < since_ts:
                continue
            if actor is not None and (v.get("actor") or {}).get("name") != actor:
                continue
            if target is not None and not str(v.get("target", "")).startswith(target):
                continue
            if action is not None and action not in str(v.get("action", "")):
                continue
            out.append(v)
        return out[-limit:] if limit else out

    async def public_key_pem(self) -> str:
        if self._key is None:
            self._key = await asyncio.to_thread(keys.load_or_create, self.key_path)
        return keys.public_pem(self._key.public_key())

    async def verify(self) -> VerifyReport:
        """The chain, the checkpoints in the store, a checkpoint at every multiple of the interval, and the
        store held against the anchor file."""
        trusted = await asyncio.to_thread(keys.trusted_keys, self.key_path)
        anchored = await asyncio.to_thread(anchors.read, self.anchor_path)
        return verify_entries(
            [(e.key, e.value) for e in await self.store.range(PREFIX)],
            [(e.key, e.value) for e in await self.store.range(CHECKPOINT_PREFIX)],
            trusted,
            anchored=anchored,
            anchor_file=str(self.anchor_path),
            every=self.checkpoint_every,
        )


def parse_time(text: str) -> float:
    try:
        t = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        from kasou.errors import InvalidSpec

        raise InvalidSpec(f"not an ISO 8601 time: {text!r}", field="since") from None
    if t.tzinfo is None:
        t = t.replace(tzinfo=dt.UTC)
    return t.timestamp()


def _key_seq(key: str, prefix: str) -> int | None:
    rest = key[len(prefix) :]
    return int(rest) if rest.isdigit() and len(rest) == SEQ_DIGITS else None


def verify_entries(
    records: list[tuple[str, dict[str, Any]]],
    checkpoints: list[tuple[str, dict[str, Any]]],
    trusted: dict[str, Any],
    anchored: list[anchors.Anchor] | None = None,
    anchor_file: str | None = None,
    every: int | None = None,
) -> VerifyReport:
    """Walk the chain (records in key order), the checkpoints in the store, the checkpoints ``anchored``
    outside it (None: no anchor file) and, with ``every`` (the verifier's interval, used until a checkpoint
    declares one), a checkpoint at every multiple of the interval; the first problem, by sequence number."""
    problem: Problem | None = None
    prev, expected = GENESIS, 1
    hashes: dict[int, str] = {}
    last_seq: int | None = None
    for key, v in records:
        seq = _key_seq(key, PREFIX)
        if seq is None:
            problem = Problem(kind="malformed", seq=expected, message=f"a key {key!r} that is no record's")
            break
        if seq != expected:
            gone = f"record {expected}" if seq == expected + 1 else f"records {expected} to {seq - 1}"
            problem = Problem(kind="deleted", seq=expected, message=f"{gone} missing: the log goes on at {seq}")
            break
        if v.get("seq") != seq:
            problem = Problem(
                kind="reordered",
                seq=seq,
                message=f"the record stored as {seq} says it is record {v.get('seq')}: records were moved",
            )
            break
        try:
            h = digest(v)
        except (TypeError, ValueError) as e:
            problem = Problem(kind="malformed", seq=seq, message=f"record {seq} cannot be hashed: {e}")
            break
        if h != v.get("hash"):
            problem = Problem(
                kind="edited",
                seq=seq,
                message=f"record {seq} was changed after it was written: its content does not match its hash",
            )
            break
        if v.get("prev_hash") != prev:
            problem = Problem(
                kind="reordered",
                seq=seq,
                message=f"record {seq} does not follow record {seq - 1} (prev_hash mismatch): records "
                f"were reordered or replaced, or record {seq - 1} was rewritten with a new hash",
            )
            break
        prev, hashes[seq], last_seq, expected = h, h, seq, seq + 1
    checked_upto = problem.seq if problem is not None else None
    found: list[Problem] = [problem] if problem is not None else []
    declared: dict[int, int] = {}  # seq -> the interval a valid checkpoint declares from there on
    stored: set[int] = set()
    last_cp: int | None = None
    ends = f"ends at {last_seq}" if last_seq else "is empty"

    def signed(cp: Checkpoint, where: str) -> Problem | None:
        pub = trusted.get(cp.key_id)
        if pub is None:
            return Problem(kind="unknown_key", seq=cp.seq, message=f"{where} is signed by key {cp.key_id} "
                           f"(host {cp.host}), which this verifier does not trust")  # fmt: skip
        if not keys.check(pub, cp.seq, cp.hash, cp.signature, cp.every):
            forged = f"{where}'s signature is not valid: the checkpoint was forged or changed"
            return Problem(kind="bad_signature", seq=cp.seq, message=forged)
        if cp.every is not None and cp.every >= 1:
            declared[cp.seq] = cp.every
        return None

    for key, v in checkpoints:
        seq = _key_seq(key, CHECKPOINT_PREFIX)
        try:
            cp = Checkpoint.model_validate(v)
        except ValueError:
            cp = None
        if seq is None or cp is None or cp.seq != seq:
            found.append(Problem(kind="malformed", seq=seq or 0, message=f"the checkpoint {key!r} is malformed"))
            break
        bad = signed(cp, f"checkpoint {seq}")
        if bad is not None:
            found.append(bad)
            break
        last_cp = seq
        stored.add(seq)
        if checked_upto is not None and seq >= checked_upto:
            continue  # the chain is already broken before it: that is the problem to report
        if last_seq is None or seq > last_seq:
            found.append(Problem(
                kind="truncated", seq=(last_seq or 0) + 1,
                message=f"checkpoint {seq} seals records up to {seq} but the log {ends}: records "
                f"{(last_seq or 0) + 1} to {seq} were deleted",
            ))  # fmt: skip
            break
        if hashes.get(seq) != cp.hash:
            found.append(Problem(
                kind="checkpoint_mismatch", seq=seq,
                message=f"record {seq} does not match the signed checkpoint {seq}: the log up to {seq} was rewritten",
            ))  # fmt: skip
            break
    last_anchor: int | None = None
    for a in anchored or []:
        where = f"line {a.line} of the anchor file {anchor_file}"
        try:
            cp = Checkpoint.model_validate(a.value) if a.value is not None else None
        except ValueError:
            cp = None
        if cp is None:
            found.append(Problem(kind="malformed", seq=0, message=f"{where} is not a checkpoint"))
            break
        bad = signed(cp, f"the checkpoint {cp.seq} at {where}")
        if bad is not None:
            found.append(bad)
            break
        last_anchor = max(cp.seq, last_anchor or 0)
        if checked_upto is not None and cp.seq >= checked_upto:
            continue
        if last_seq is None or cp.seq > last_seq:
            found.append(Problem(
                kind="truncated", seq=(last_seq or 0) + 1,
                message=f"checkpoint {cp.seq} is anchored at {where} but the log {ends}: records "
                f"{(last_seq or 0) + 1} to {cp.seq} were deleted",
            ))  # fmt: skip
            break
        if hashes.get(cp.seq) != cp.hash:
            found.append(Problem(
                kind="checkpoint_mismatch", seq=cp.seq,
                message=f"record {cp.seq} does not match the checkpoint {cp.seq} anchored at {where}: "
                f"the log up to {cp.seq} was rewritten",
            ))  # fmt: skip
            break
        if cp.seq not in stored:
            found.append(Problem(
                kind="checkpoint_missing", seq=cp.seq,
                message=f"checkpoint {cp.seq} is anchored at {where} but missing from the store: "
                "checkpoints were deleted",
            ))  # fmt: skip
            break
    limit = (checked_upto - 1) if checked_upto is not None else (last_seq or 0)
    missing = _missing_checkpoint(limit, stored, declared, every)
    if missing is not None:
        seq, n = missing
        found.append(Problem(
            kind="checkpoint_missing", seq=seq,
            message=f"no signed checkpoint at record {seq}, although one is written every {n} records: "
            f"checkpoints were deleted from the store (or its writer stopped between the record and its checkpoint)",
        ))  # fmt: skip
    problem = min(found, key=lambda p: p.seq) if found else None  # the first by seq; on a tie the first found
    first = _key_seq(records[0][0], PREFIX) if records else None
    sealed = max(last_cp or 0, last_anchor or 0)
    return VerifyReport(
        ok=problem is None,
        records=len(records),
        first_seq=first,
        last_seq=_key_seq(records[-1][0], PREFIX) if records else None,
        head_hash=str(records[-1][1].get("hash")) if records else None,
        checkpoints=len(checkpoints),
        last_checkpoint=last_cp,
        unsealed=(last_seq or 0) - sealed if problem is None else 0,
        problem=problem,
        anchor_file=anchor_file,
        anchors=len(anchored or []),
        last_anchor=last_anchor,
    )


def _missing_checkpoint(
    limit: int, stored: set[int], declared: dict[int, int], every: int | None
) -> tuple[int, int] | None:
    """The first multiple of the interval up to record ``limit`` without a checkpoint in the store, and that
    interval. The interval of a stretch is the one its last preceding checkpoint declared; before the first
    one, the first declared; with none declared, ``every`` (None: no such check)."""
    points = sorted(declared.items())
    n = points[0][1] if points else every
    if n is None:
        return None
    lo = 0
    for at, nxt in [*points, (limit, n)]:
        hi = min(at, limit)
        m = (lo // n + 1) * n
        while m <= hi:
            if m not in stored:
                return m, n
            m += n
        if at >= limit:
            return None
        lo, n = at, nxt
    return None
