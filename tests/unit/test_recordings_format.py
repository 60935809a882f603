"""The console recording format (kasou.control.recordings): a round trip, and tampering, truncation,
reordering and splicing detected on reading."""

from __future__ import annotations

import asyncio
import errno
import hashlib
import os
import struct
from pathlib import Path
from typing import Any

import pytest

from kasou.control import recordings as rec
from kasou.errors import Conflict

KEY = bytes(range(32))
RID = "0" * 31 + "1"


def record(path: Path, chunks: list[tuple[int, bytes]], rid: str = RID, key: bytes = KEY) -> dict[str, Any]:
    async def go() -> dict[str, Any]:
        w = rec.RecordingWriter(path, key, rid, {"vm": "emr1", "user": "op1"})
        await w.start()
        for d, data in chunks:
            await w.add(d, data)
        return await w.close()

    return asyncio.run(go())


def frames_of(path: Path) -> tuple[bytes, list[bytes]]:
    """The file's header and its frames, as bytes."""
    raw = path.read_bytes()
    (n,) = struct.unpack_from(">H", raw, len(rec.MAGIC))
    pos = len(rec.MAGIC) + 2 + n
    head, frames = raw[:pos], []
    while pos < len(raw):
        (length, _) = rec.FRAME.unpack_from(raw, pos)
        frames.append(raw[pos : pos + rec.FRAME.size + length])
        pos += rec.FRAME.size + length
    return head, frames


def read_all(path: Path, key: bytes = KEY) -> list[tuple[int, int, bytes]]:
    with open(path, "rb") as f:
        return list(rec.events(rec.read_frames(f, key, RID)))


def test_round_trip_in_order_with_times_and_digest(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rec, "CHUNK_BYTES", 1000)  # several chunks
    p = tmp_path / "r.kasourec"
    data = [(i % 2, os.urandom(100 + i)) for i in range(60)]
    end = record(p, data)
    assert oct(p.stat().st_mode & 0o777) == "0o600"
    got = read_all(p)
    assert [(d, b) for d, _, b in got] == data
    times = [t for _, t, _ in got]
    assert times == sorted(times)
    stream = b"".join(rec.encode_event(d, t, b) for d, t, b in got)
    assert end["sha256"] == hashlib.sha256(stream).hexdigest() and end["complete"] and end["events"] == 60
    assert end["size"] == p.stat().st_size
    c = rec.check(p, KEY, RID)
    assert c["digest_ok"] and c["meta"]["vm"] == "emr1" and c["trailer"]["events"] == 60
    assert len(frames_of(p)[1]) >= 5
    assert b"emr1" not in p.read_bytes()  # the metadata is sealed too


def test_an_altered_byte_is_found(tmp_path: Path) -> None:
    p = tmp_path / "r.kasourec"
    record(p, [(0, b"screen" * 100), (1, b"keys")])
    raw = bytearray(p.read_bytes())
    raw[-40] ^= 1
    p.write_bytes(bytes(raw))
    with pytest.raises(Conflict, match="does not open"):
        read_all(p)


def test_a_cut_file_is_found(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rec, "CHUNK_BYTES", 100)
    p = tmp_path / "r.kasourec"
    record(p, [(0, os.urandom(150)) for _ in range(5)])
    head, frames = frames_of(p)
    p.write_bytes(head + b"".join(frames[:-1]))  # the final frame dropped: whole frames, all of which open
    with pytest.raises(Conflict, match="cut short"):
        read_all(p)
    p.write_bytes(head + b"".join(frames)[:-5])
    with pytest.raises(Conflict, match="cut short"):
        read_all(p)


def test_reordered_or_dropped_frames_are_found(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rec, "CHUNK_BYTES", 100)
    p = tmp_path / "r.kasourec"
    record(p, [(0, os.urandom(150)) for _ in range(5)])
    head, f = frames_of(p)
    p.write_bytes(head + f[0] + f[2] + f[1] + b"".join(f[3:]))
    with pytest.raises(Conflict, match=r"frame 1 .* does not open"):
        read_all(p)
    p.write_bytes(head + f[0] + b"".join(f[2:]))
    with pytest.raises(Conflict, match="does not open"):
        read_all(p)
    final = bytearray(f[-1])
    final[4] = 0  # the final frame claims not to be final
    p.write_bytes(head + b"".join(f[:-1]) + bytes(final))
    with pytest.raises(Conflict, match="does not open"):
        read_all(p)


def test_a_frame_from_another_recording_is_found(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    record(a, [(0, b"alpha" * 50)])
    record(b, [(0, b"bravo" * 50)], rid="f" * 32)
    ha, fa = frames_of(a)
    _, fb = frames_of(b)
    a.write_bytes(ha + fa[0] + fb[1] + fa[2])  # spliced: same index, same key, another id
    with pytest.raises(Conflict, match="does not open"):
        read_all(a)


def test_another_key_or_file_is_refused_clearly(tmp_path: Path) -> None:
    p = tmp_path / "r"
    record(p, [(1, b"x")])
    with pytest.raises(Conflict, match="secrets key"):
        read_all(p, key=bytes(32))
    with open(p, "rb") as f, pytest.raises(Conflict, match="holds recording"):
        list(rec.read_frames(f, KEY, "e" * 32))
    (tmp_path / "junk").write_bytes(b"hello")
    with pytest.raises(Conflict, match="not a kasou console recording"):
        rec.check(tmp_path / "junk", KEY)


def test_a_full_disk_is_reported_not_hidden(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rec, "CHUNK_BYTES", 100)
    p = tmp_path / "r"
    real = rec.write_all
    calls = {"n": 0}

    def full(f: Any, data: bytes) -> None:
        calls["n"] += 1
        if calls["n"] > 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(f, data)

    monkeypatch.setattr(rec, "write_all", full)

    async def go() -> tuple[dict[str, Any], bool]:
        w = rec.RecordingWriter(p, KEY, RID, {})
        await w.start()
        for _ in range(20):
            await w.add(0, b"z" * 150)
        await asyncio.sleep(0.05)
        return await w.close(), w.failed.is_set()

    end, failed = asyncio.run(go())
    assert failed and not end["complete"] and "No space left" in end["error"]
    with pytest.raises(Conflict, match="without its final frame"):
        read_all(p)


def test_memory_is_bounded_when_the_disk_is_slow(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rec, "CHUNK_BYTES", 1000)
    slow = rec.write_all

    def slowly(f: Any, data: bytes) -> None:
        import time

        time.sleep(0.002)
        slow(f, data)

    monkeypatch.setattr(rec, "write_all", slowly)

    async def go() -> int:
        w = rec.RecordingWriter(tmp_path / "r", KEY, RID, {})
        await w.start()
        most = 0
        for _ in range(200):
            await w.add(0, b"q" * 1000)
            most = max(most, w.queued())
        await w.close()
        return most

    assert asyncio.run(go()) <= rec.QUEUE_CHUNKS
    assert len(read_all(tmp_path / "r")) == 200
