"""The audit log itself: hash-chained records appended to the store, signed checkpoints and their anchors.

The record format is :mod:`kasou.control.audit.records`; verification, :mod:`kasou.control.audit.verify`."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import os
import time
from pathlib import Path
from typing import Any

from kasou.config import audit_checkpoint_every, audit_checkpoint_minutes, audit_syslog, host_name
from kasou.control.audit import anchors, keys
from kasou.control.audit.records import (
    CHECKPOINT_MSG_ID,
    CHECKPOINT_PREFIX,
    GENESIS,
    HEAD_KEY,
    LOCAL_SYSLOG,
    MAX_TRIES,
    PREFIX,
    TEXT_MAX,
    Actor,
    AuditRecord,
    Checkpoint,
    Result,
    VerifyReport,
    checkpoint_key,
    clock_state,
    digest,
    seq_key,
    small_details,
    utc_now,
)
from kasou.control.audit.syslog import SyslogForwarder
from kasou.control.audit.verify import verify_entries
from kasou.errors import StoreConflict, StoreError
from kasou.store.base import Store

log = logging.getLogger(__name__)

# -- the log ----------------------------------------------------------------------------------


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
        self.checkpoint_every = max(1, int(checkpoint_every or audit_checkpoint_every()))
        self.checkpoint_s = 60 * (checkpoint_minutes or audit_checkpoint_minutes())
        target = syslog if syslog is not None else audit_syslog()
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
