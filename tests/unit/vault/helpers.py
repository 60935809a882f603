"""What the backup server's tests share: a fake clock, fake sealed blobs and indexes, and the clean-up of
files made immutable (pytest could not remove them otherwise)."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from kasou.vault import immutable
from kasou.vault.index import CHUNK_SIZE
from kasou.vault.store import Store

T0 = 1_790_000_000.0  # 2026-09-21 (UTC)


@dataclass
class Clock:
    t: float = T0

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds


def blob(n: int = 64) -> bytes:
    """A fake sealed chunk: the magic and random bytes (the server never decrypts)."""
    return b"KSC1" + os.urandom(n)


def fake_id(data: bytes) -> str:
    return hashlib.sha256(b"id" + data).hexdigest()


def put_blobs(store: Store, count: int) -> list[str]:
    ids = []
    for _ in range(count):
        b = blob()
        cid = fake_id(b)
        store.put_chunk(cid, b)
        ids.append(cid)
    return ids


def make_index(vm: str, generation: int, chunks: list[str | None], config: str, /, **over: Any) -> dict[str, Any]:
    index: dict[str, Any] = {
        "vm": vm,
        "vm_uuid": "6f1c1c9e-0000-4000-8000-000000000001",
        "generation": generation,
        "created": T0,
        "key_fingerprint": "0123456789abcdef",
        "chunk_size": CHUNK_SIZE,
        "disks": [{"disk_id": "root", "size": len(chunks) * CHUNK_SIZE, "chunks": chunks}],
        "config": config,
        "bytes_sent": 1000,
        "bytes_logical": len(chunks) * CHUNK_SIZE,
    }
    index.update(over)
    return index


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def store(tmp_path: Path, clock: Clock) -> Iterator[Store]:
    s = Store.create(tmp_path / "vault", "site-a", clock=clock)
    try:
        yield s
    finally:
        immutable.release_tree(tmp_path)
