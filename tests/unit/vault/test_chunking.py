"""Disk images as chunks and back (kasou.vault.chunking): zeros, a short last chunk, incremental reuse."""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

import pytest

from kasou.errors import AlreadyExists, BackupCorrupt, InvalidSpec
from kasou.vault.chunking import Chunk, chunk_count, chunk_length, split, write_image
from kasou.vault.crypt import CHUNK_SIZE, BackupKey, chunk_id

MiB = 1024 * 1024


class CountingReader(io.BytesIO):
    """A seekable image that counts the bytes read from it."""

    def __init__(self, data: bytes) -> None:
        super().__init__(data)
        self.bytes_read = 0

    def read(self, n: Any = -1) -> bytes:
        out = super().read(n)
        self.bytes_read += len(out)
        return out


@pytest.fixture(scope="module")
def key() -> BackupKey:
    return BackupKey.generate()


def image(*parts: bytes) -> bytes:
    """Chunks given one by one (each padded to a full chunk except the last)."""
    padded = [p.ljust(CHUNK_SIZE, b"\0") for p in parts[:-1]]
    return b"".join([*padded, parts[-1]])


def test_sizes() -> None:
    assert chunk_count(0) == 0 and chunk_count(1) == 1 and chunk_count(CHUNK_SIZE) == 1
    assert chunk_count(CHUNK_SIZE + 1) == 2
    assert chunk_length(CHUNK_SIZE + 5, 1) == 5 and chunk_length(CHUNK_SIZE + 5, 0) == CHUNK_SIZE


def test_zeros_and_a_short_last_chunk(key: BackupKey) -> None:
    data = image(b"a" * 100, b"", b"b", b"c" * MiB)  # chunk 1 all zeros; the last 1 MiB long
    chunks = list(split(io.BytesIO(data), len(data), key.public()))
    assert [c.index for c in chunks] == [0, 1, 2, 3]
    assert chunks[1] == Chunk(1, None, None)
    assert chunks[0].data == data[:CHUNK_SIZE] and chunks[0].id == chunk_id(key, data[:CHUNK_SIZE])
    assert chunks[3].data == b"c" * MiB


def test_a_short_last_chunk_of_zeros(key: BackupKey, tmp_path: Path) -> None:
    path = tmp_path / "disk.raw"
    with open(path, "wb") as f:
        f.write(b"x")
        f.truncate(CHUNK_SIZE + 4096)
    chunks = list(split(path, CHUNK_SIZE + 4096, key.public()))
    assert chunks[0].id is not None and chunks[1] == Chunk(1, None, None)


def test_an_image_shorter_than_its_size_is_refused(key: BackupKey) -> None:
    with pytest.raises(InvalidSpec, match="ends at byte 10"):
        list(split(io.BytesIO(b"x" * 10), 20, key.public()))
    with pytest.raises(InvalidSpec, match="cannot read"):
        list(split("/nonexistent/disk.raw", 20, key.public()))


def test_incremental_reads_only_the_changed_chunks(key: BackupKey) -> None:
    pub = key.public()
    before = image(b"a", b"b", b"", b"d", b"e" * MiB)
    previous = [c.id for c in split(io.BytesIO(before), len(before), pub)]
    after = bytearray(before)
    after[CHUNK_SIZE + 7] = ord("B")  # chunk 1 changed
    after[2 * CHUNK_SIZE] = ord("C")  # chunk 2 was zeros
    reader = CountingReader(bytes(after))
    chunks = list(split(reader, len(after), pub, previous=previous, changed={1, 2}))
    assert reader.bytes_read == 2 * CHUNK_SIZE
    assert [c.read for c in chunks] == [False, True, True, False, False]
    assert [c.id for c in chunks] == [c.id for c in split(io.BytesIO(bytes(after)), len(after), pub)]


def test_without_changes_everything_is_read(key: BackupKey) -> None:
    data = image(b"a", b"b")
    previous = [c.id for c in split(io.BytesIO(data), len(data), key.public())]
    reader = CountingReader(data)
    list(split(reader, len(data), key.public(), previous=previous))
    assert reader.bytes_read == len(data)


def test_a_grown_disk_reads_its_old_last_chunk_and_the_new_ones(key: BackupKey) -> None:
    pub = key.public()
    before = image(b"a", b"b" * MiB)
    previous = [c.id for c in split(io.BytesIO(before), len(before), pub)]
    after = image(b"a", b"b" * MiB, b"c" * MiB)
    reader = CountingReader(after)
    chunks = list(split(reader, len(after), pub, previous=previous, previous_size=len(before), changed=set()))
    assert [c.read for c in chunks] == [False, True, True]
    assert reader.bytes_read == CHUNK_SIZE + MiB


def test_write_image_is_sparse_and_exact(key: BackupKey, tmp_path: Path) -> None:
    data = image(b"a" * 10, b"", b"", b"a" * 10, b"z" * 4096)  # chunks 0 and 3 identical
    chunks = list(split(io.BytesIO(data), len(data), key.public()))
    plain = {c.id: c.data for c in chunks if c.id is not None}
    fetched: list[str] = []

    def fetch(cid: str) -> bytes:
        fetched.append(cid)
        return plain[cid] or b""

    dest = tmp_path / "restored.raw"
    written = write_image(dest, len(data), [c.id for c in chunks], fetch)
    assert dest.read_bytes() == data
    assert written == 2 * CHUNK_SIZE + 4096 and len(fetched) == 2  # the repeated chunk fetched once
    assert dest.stat().st_blocks * 512 < len(data) - CHUNK_SIZE  # the zero chunks are holes
    assert [p.name for p in tmp_path.iterdir()] == ["restored.raw"]


def test_write_image_leaves_nothing_when_it_fails(tmp_path: Path) -> None:
    dest = tmp_path / "restored.raw"
    with pytest.raises(BackupCorrupt, match="holds 3 bytes"):
        write_image(dest, CHUNK_SIZE, ["a" * 64], lambda cid: b"abc")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(InvalidSpec, match="2 chunks"):
        write_image(dest, CHUNK_SIZE + 1, ["a" * 64], lambda cid: b"")
    dest.write_bytes(b"keep")
    with pytest.raises(AlreadyExists):
        write_image(dest, 0, [], lambda cid: b"")
    assert dest.read_bytes() == b"keep"


def test_zero_size(key: BackupKey, tmp_path: Path) -> None:
    assert list(split(io.BytesIO(b""), 0, key.public())) == []
    write_image(tmp_path / "empty.raw", 0, [], lambda cid: b"")
    assert (tmp_path / "empty.raw").stat().st_size == 0
    assert os.path.getsize(tmp_path / "empty.raw") == 0
