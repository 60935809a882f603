"""Signed checkpoints anchored outside the store: an append-only file of one JSON line per checkpoint.

Whoever can write the store can delete checkpoints there and rewrite the records consistently, or cut
the log's end together with its last checkpoint; they cannot take back what was written elsewhere. Each
checkpoint is therefore also appended to this file (and sent to syslog), and ``kasou audit verify``
holds the store against it: every anchored checkpoint must still be in the store, its record must still
have the anchored hash, and the log must not end before it.

The file: ``KASOU_AUDIT_ANCHOR`` (a path on another machine's mount, say), else ``audit-anchors.jsonl``
beside the SQLite store (one host: its kasou home), else in ``$KASOU_HOME``. Mode 0600, opened with
``O_APPEND`` for every line and synced; kasou never rewrites or shortens it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kasou.config import Paths, site_file
from kasou.store.base import Store

ANCHOR_FILE = "audit-anchors.jsonl"
ANCHOR_ENV = "KASOU_AUDIT_ANCHOR"
MAX_LINE = 4096


def default_anchor_path(store: Store | None = None) -> Path:
    return site_file(ANCHOR_FILE, ANCHOR_ENV, store.local_dir() if store else None, Paths.from_env().home)


def append(path: Path, checkpoint: dict[str, Any]) -> None:
    """Append one checkpoint as a line, synced (OSError if the file cannot be written)."""
    line = json.dumps(checkpoint, sort_keys=True, separators=(",", ":"), ensure_ascii=False) + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        if os.fstat(fd).st_mode & 0o077:
            os.fchmod(fd, 0o600)
        os.write(fd, line.encode())
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass(frozen=True)
class Anchor:
    line: int  # 1-based line number in the file
    value: dict[str, Any] | None  # None: the line is not a JSON object


def read(path: Path) -> list[Anchor] | None:
    """The file's anchors in order; None if there is no file. A last line without its newline (a write
    cut short by a crash) is left out."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    lines = data.split(b"\n")
    out: list[Anchor] = []
    for n, raw in enumerate(lines[:-1], start=1):  # the part after the last newline is unfinished
        if not raw.strip():
            continue
        value: Any = None
        if len(raw) <= MAX_LINE:
            try:
                value = json.loads(raw)
            except (ValueError, UnicodeDecodeError, RecursionError):
                value = None
        out.append(Anchor(n, value if isinstance(value, dict) else None))
    return out
