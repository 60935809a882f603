"""The embedded store for a single host: SQLite in WAL mode, with etcd-like revisions."""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import threading
from pathlib import Path
from typing import Any

from kasou.errors import StoreConflict, StoreError
from kasou.store.base import Entry, Store

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
"""


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

    def _private(self) -> None:
        """The store and its WAL files are root's alone (0600), whatever the umask: no VM's QEMU user, no
        other local account reads the users, tokens' hashes and sealed secrets in it."""
        for suffix in ("", "-wal", "-shm"):
            with contextlib.suppress(OSError):
                os.chmod(self.path + suffix, 0o600)

    def _next_rev(self) -> int:
        self._db.execute("UPDATE meta SET value = value + 1 WHERE name = 'revision'")
        row = self._db.execute("SELECT value FROM meta WHERE name = 'revision'").fetchone()
        return int(row[0])

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
                self._db.execute("COMMIT")
                return rev
            except sqlite3.Error as e:
                self._rollback()
                raise StoreError(f"state store write failed: {e}") from None

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
                self._next_rev()
                self._db.execute("COMMIT")
                return True
            except sqlite3.Error as e:
                self._rollback()
                raise StoreError(f"state store delete failed: {e}") from None

    async def delete_prefix(self, prefix: str) -> int:
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                cur = self._db.execute("DELETE FROM kv WHERE key >= ? AND key < ?", (prefix, _prefix_end(prefix)))
                self._next_rev()
                self._db.execute("COMMIT")
                return cur.rowcount
            except sqlite3.Error as e:
                self._rollback()
                raise StoreError(f"state store delete failed: {e}") from None

    def _rollback(self) -> None:
        with contextlib.suppress(sqlite3.Error):
            self._db.execute("ROLLBACK")

    def local_dir(self) -> Path:
        return Path(self.path).absolute().parent

    async def close(self) -> None:
        with self._lock:
            self._db.close()
