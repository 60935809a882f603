"""The embedded store for a single host: SQLite in WAL mode, with etcd-like revisions and watches.

Watches: every write also appends what it changed to a change log (``changes``: revision, key, the new
value or NULL for a delete) in the same transaction, trimmed to the last :data:`HISTORY` revisions, as
etcd keeps its history until compaction. A watcher reads the log from the revision it has reached. It is
woken at once by every commit made in this process (the single-host control plane owns the file: all
writes go through a :class:`SqliteStore` of this process, whichever instance), through a registry of
watchers per file. A commit by another process (``kasou`` commands that open the file themselves) is
noticed by polling ``PRAGMA data_version`` every :data:`POLL_S` seconds: such a change shows within
that time, not at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sqlite3
import threading
from pathlib import Path
from typing import Any

from kasou.errors import StoreConflict, StoreError
from kasou.store.base import Entry, Store, Watch, WatchEvent

_SCHEMA = """
CREATE TABLE IF NOT EXISTS kv (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL,
    mod_rev INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (
    name TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
INSERT OR IGNORE INTO meta(name, value) VALUES ('revision', 0);
CREATE TABLE IF NOT EXISTS changes (
    rev INTEGER NOT NULL,
    key TEXT NOT NULL,
    value TEXT,
    PRIMARY KEY (rev, key)
) WITHOUT ROWID;
INSERT OR IGNORE INTO meta(name, value) VALUES ('compacted', 0);
"""

HISTORY = 2000  # revisions kept in the change log: watchers in this process are never more than a few behind
TRIM_EVERY = 64  # the log is trimmed at every revision that is a multiple of this
POLL_S = 0.5  # how often a watcher looks for commits of other processes (PRAGMA data_version)

# Watchers per database file (its absolute path): every commit wakes those of its file. Each waker is called
# from the writer's thread and hands the wake-up to the watcher's own event loop.
_watchers: dict[str, set[_Waker]] = {}
_watchers_lock = threading.Lock()


class _Waker:
    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.event = asyncio.Event()

    def wake(self) -> None:
        with contextlib.suppress(RuntimeError):  # its loop has closed: the watcher is gone
            self.loop.call_soon_threadsafe(self.event.set)


def registered(path: str | Path) -> int:
    """How many watchers are registered on the database file ``path`` in this process."""
    with _watchers_lock:
        return len(_watchers.get(str(Path(path).absolute()), ()))


def _notify(path: str) -> None:
    with _watchers_lock:
        wakers = list(_watchers.get(path, ()))
    for w in wakers:
        w.wake()


def _prefix_end(prefix: str) -> str:
    # Every key under ``prefix`` sorts below the prefix with its last character
    # incremented (SQLite compares text as UTF-8 bytes, which keeps code point order).
    # The empty prefix means every key: compare against a bound no key reaches.
    if not prefix:
        return "\U0010ffff" * 64
    return prefix[:-1] + chr(ord(prefix[-1]) + 1)


class SqliteStore(Store):
    def __init__(self, path: Path | str) -> None:
        self.path = str(path)
        try:
            self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=10)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(_SCHEMA)
            self._private()
        except sqlite3.Error as e:
            raise StoreError(f"cannot open the state store {self.path}: {e}") from None
        self._lock = threading.Lock()
        self._key = str(Path(self.path).absolute())

    def _private(self) -> None:
        """The store and its WAL files are root's alone (0600), whatever the umask: no VM's QEMU user, no
        other local account reads the users, tokens' hashes and sealed secrets in it."""
        for suffix in ("", "-wal", "-shm"):
            with contextlib.suppress(OSError):
                os.chmod(self.path + suffix, 0o600)

    def _next_rev(self) -> int:
        self._db.execute("UPDATE meta SET value = value + 1 WHERE name = 'revision'")
        row = self._db.execute("SELECT value FROM meta WHERE name = 'revision'").fetchone()
        rev = int(row[0])
        if rev > HISTORY and rev % TRIM_EVERY == 0:  # trim the change log now and then, inside the write
            self._db.execute("DELETE FROM changes WHERE rev <= ?", (rev - HISTORY,))
            self._db.execute("UPDATE meta SET value = ? WHERE name = 'compacted'", (rev - HISTORY,))
        return rev

    def _log(self, rev: int, key: str, data: str | None) -> None:
        self._db.execute("INSERT OR REPLACE INTO changes(rev, key, value) VALUES (?, ?, ?)", (rev, key, data))

    async def get(self, key: str) -> Entry | None:
        with self._lock:
            row = self._db.execute("SELECT key, value, mod_rev FROM kv WHERE key = ?", (key,)).fetchone()
        return None if row is None else Entry(row[0], json.loads(row[1]), row[2])

    async def range(self, prefix: str) -> list[Entry]:
        with self._lock:
            rows = self._db.execute(
                "SELECT key, value, mod_rev FROM kv WHERE key >= ? AND key < ? ORDER BY key",
                (prefix, _prefix_end(prefix)),
            ).fetchall()
        return [Entry(r[0], json.loads(r[1]), r[2]) for r in rows]

    async def put(self, key: str, value: dict[str, Any], expect_rev: int | None = None) -> int:
        data = json.dumps(value, separators=(",", ":"), sort_keys=True)
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                row = self._db.execute("SELECT mod_rev FROM kv WHERE key = ?", (key,)).fetchone()
                current = 0 if row is None else int(row[0])
                if expect_rev is not None and current != expect_rev:
                    self._db.execute("ROLLBACK")
                    raise StoreConflict(f"{key} changed concurrently", key=key)
                rev = self._next_rev()
                self._db.execute(
                    "INSERT INTO kv(key, value, mod_rev) VALUES (?, ?, ?) "
                    "ON CONFLICT(key) DO UPDATE SET value = excluded.value, mod_rev = excluded.mod_rev",
                    (key, data, rev),
                )
                self._log(rev, key, data)
                self._db.execute("COMMIT")
            except sqlite3.Error as e:
                self._rollback()
                raise StoreError(f"state store write failed: {e}") from None
        _notify(self._key)
        return rev

    async def delete(self, key: str, expect_rev: int | None = None) -> bool:
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                row = self._db.execute("SELECT mod_rev FROM kv WHERE key = ?", (key,)).fetchone()
                if row is None:
                    self._db.execute("ROLLBACK")
                    return False
                if expect_rev is not None and int(row[0]) != expect_rev:
                    self._db.execute("ROLLBACK")
                    raise StoreConflict(f"{key} changed concurrently", key=key)
                self._db.execute("DELETE FROM kv WHERE key = ?", (key,))
                self._log(self._next_rev(), key, None)
                self._db.execute("COMMIT")
            except sqlite3.Error as e:
                self._rollback()
                raise StoreError(f"state store delete failed: {e}") from None
        _notify(self._key)
        return True

    async def delete_prefix(self, prefix: str) -> int:
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                bounds = (prefix, _prefix_end(prefix))
                keys = [r[0] for r in self._db.execute("SELECT key FROM kv WHERE key >= ? AND key < ?", bounds)]
                self._db.execute("DELETE FROM kv WHERE key >= ? AND key < ?", bounds)
                rev = self._next_rev()
                for key in keys:
                    self._log(rev, key, None)
                self._db.execute("COMMIT")
            except sqlite3.Error as e:
                self._rollback()
                raise StoreError(f"state store delete failed: {e}") from None
        if keys:
            _notify(self._key)
        return len(keys)

    def _rollback(self) -> None:
        with contextlib.suppress(sqlite3.Error):
            self._db.execute("ROLLBACK")

    def local_dir(self) -> Path:
        return Path(self.path).absolute().parent

    async def close(self) -> None:
        with self._lock:
            self._db.close()
        _notify(self._key)  # watchers on this instance see it closed; the others read on

    # -- watches ---------------------------------------------------------------------------------------

    def watch(self, prefix: str) -> Watch:
        return SqliteWatch(self, prefix)

    def changes(self, prefix: str, after: int) -> tuple[int, int, list[WatchEvent]]:
        """The change log under ``prefix`` after revision ``after``: (the store's revision now, the last
        revision trimmed from the log, the changes up to now in revision order)."""
        with self._lock:
            try:
                self._db.execute("BEGIN")  # one snapshot of the revision and the log
                now = int(self._db.execute("SELECT value FROM meta WHERE name = 'revision'").fetchone()[0])
                trimmed = int(self._db.execute("SELECT value FROM meta WHERE name = 'compacted'").fetchone()[0])
                rows = self._db.execute(
                    "SELECT rev, key, value FROM changes WHERE rev > ? AND rev <= ? AND key >= ? AND key < ? "
                    "ORDER BY rev, key",
                    (after, now, prefix, _prefix_end(prefix)),
                ).fetchall()
                self._db.execute("COMMIT")
            except sqlite3.Error as e:
                self._rollback()
                raise StoreError(f"state store read failed: {e}") from None
        events = [
            WatchEvent("delete", key, None, rev) if value is None else WatchEvent("put", key, json.loads(value), rev)
            for rev, key, value in rows
        ]
        return now, trimmed, events

    def data_version(self) -> int | None:
        """SQLite's ``PRAGMA data_version``: changes when another connection commits. None once closed."""
        with self._lock:
            try:
                return int(self._db.execute("PRAGMA data_version").fetchone()[0])
            except sqlite3.Error:
                return None

    def register(self, waker: _Waker, on: bool) -> None:
        """Add (or remove) a watcher's waker to those every commit to this file wakes."""
        with _watchers_lock:
            if on:
                _watchers.setdefault(self._key, set()).add(waker)
            else:
                found = _watchers.get(self._key)
                if found is not None:
                    found.discard(waker)
                    if not found:
                        del _watchers[self._key]


class SqliteWatch(Watch):
    """A watch on a :class:`SqliteStore`: reads the change log, woken by this process's commits and,
    every :data:`POLL_S` seconds, by those of other processes (``PRAGMA data_version``)."""

    def __init__(self, store: SqliteStore, prefix: str) -> None:
        self.store = store
        self.prefix = prefix
        self.rev = 0
        self._waker: _Waker | None = None
        self._pending: list[WatchEvent] = []
        self._version: int | None = None
        self._closed = False

    async def start(self) -> None:
        if self._waker is not None or self._closed:
            return
        self._waker = _Waker()
        self.store.register(self._waker, True)
        self._version = self.store.data_version()
        self.rev, _, _ = self.store.changes(self.prefix, 1 << 62)

    async def next(self) -> WatchEvent | None:
        await self.start()
        while not self._pending:
            if self._closed or self._waker is None:
                return None
            self._read()
            if not self._pending and not await self._changed():
                await self.close()  # the store was closed
                return None
        return self._pending.pop(0)

    async def _changed(self) -> bool:
        """Wait until this process commits to the file, or another process has (seen within POLL_S);
        False if the store was closed meanwhile."""
        waker = self._waker
        assert waker is not None
        while True:
            woken = False
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(waker.event.wait(), POLL_S)
                woken = True
            waker.event.clear()
            if self._closed:
                return False
            version = self.store.data_version()
            if version is None:
                return False
            if woken or version != self._version:
                self._version = version
                return True

    def _read(self) -> None:
        now, trimmed, events = self.store.changes(self.prefix, self.rev)
        if self.rev < trimmed:  # fell behind the kept history: whoever watches must read the prefix again
            self._pending.append(WatchEvent("resync", "", None, now))
            self.rev = now
            return
        self._pending.extend(events)
        self.rev = now

    async def close(self) -> None:
        self._closed = True
        if self._waker is not None:
            self.store.register(self._waker, False)
            self._waker = None
