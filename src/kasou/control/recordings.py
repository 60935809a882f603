"""Console recordings: the file format (a stream of AES-256-GCM sealed chunks) and its writer and reader.

A recording is what passed through the console proxy (:mod:`kasou.api.console`), as *events*: the
server's bytes (what the screen showed, or a serial console's output) and the client's messages (keys,
pointer, or what was typed on a serial console), each with its time since the console opened::

    event := u8 direction (0 server -> client, 1 client -> server) | u64 microseconds | u32 length | bytes

The events are sealed in chunks (about ``CHUNK_BYTES``, or what came in ``CHUNK_SECONDS``, whichever is
first) with the site's secrets key (:mod:`kasou.control.sealed`)::

    file   := MAGIC | u16 n | header (n bytes of JSON: id, key_id, format) | frame*
    frame  := u32 length | u8 final | nonce (12) | AES-GCM(key, nonce, plaintext, ad)
    ad     := "kasou-recording-v1" 0 | id | u64 index | u8 final

Frame 0 holds the recording's metadata (JSON), frames 1.. the events (whole events only), and the last
frame, marked final, a JSON trailer (end, sizes, the SHA-256 of the event stream). Each nonce is random
(96 bits) and the associated data binds the recording's id, the frame's index and whether it is the
last, so a frame edited, dropped, reordered or taken from another recording does not open, and a file
cut short lacks its final frame: :func:`read_frames` raises :class:`kasou.errors.Conflict` naming the
frame. The plaintext digest in the trailer (and in the audit chain's ``console_recording`` record) is
over the events exactly as :func:`events` yields them.

:class:`RecordingWriter` never blocks the event loop: the console's coroutines append events to a buffer,
whole chunks go through a bounded queue (``QUEUE_CHUNKS``: the console waits when the disk is slower than
the console, so memory stays bounded) to one task that seals and writes them in a worker thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import struct
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from kasou.control.sealed import key_id
from kasou.errors import Conflict

MAGIC = b"KASOUREC\x01"
FORMAT = "kasou-recording-v1"
SUFFIX = ".kasourec"
FROM_SERVER, FROM_CLIENT = 0, 1
EVENT = struct.Struct(">BQI")  # direction, microseconds since the start, length
FRAME = struct.Struct(">IB")  # length of nonce + ciphertext, final
NONCE_BYTES = 12
CHUNK_BYTES = 64 * 1024
CHUNK_SECONDS = 1.0
QUEUE_CHUNKS = 16  # at most this many chunks (about 1 MiB) wait for the disk per console
MAX_FRAME = 64 * 1024 * 1024  # a frame longer than this is refused when reading (a damaged length)


def associated(rec_id: str, index: int, final: bool) -> bytes:
    return FORMAT.encode() + b"\0" + rec_id.encode() + struct.pack(">QB", index, int(final))


def seal_frame(key: bytes, rec_id: str, index: int, plaintext: bytes | bytearray, final: bool = False) -> bytes:
    nonce = os.urandom(NONCE_BYTES)
    body = nonce + AESGCM(key).encrypt(nonce, plaintext, associated(rec_id, index, final))
    return FRAME.pack(len(body), int(final)) + body


def file_header(rec_id: str, key: bytes) -> bytes:
    head = json.dumps({"id": rec_id, "key_id": key_id(key), "format": FORMAT}, sort_keys=True).encode()
    return MAGIC + struct.pack(">H", len(head)) + head


def encode_event(direction: int, micros: int, data: bytes) -> bytes:
    return EVENT.pack(direction, micros, len(data)) + data


def write_all(f: BinaryIO, data: bytes) -> None:
    """One frame to the file (a module function, so a test can make the disk full)."""
    f.write(data)
    f.flush()


class RecordingWriter:
    """One console's recording, written as it happens. ``add`` from the event loop; ``close`` at the end.

    A write that fails (the disk full, the file system gone) sets :attr:`error` and :attr:`failed`; what
    comes after is dropped (the console decides: :mod:`kasou.api.console`).
    """

    def __init__(self, path: Path, key: bytes, rec_id: str, meta: dict[str, Any]) -> None:
        self.path, self.id, self._key, self.meta = path, rec_id, key, meta
        self.error: str | None = None
        self.failed = asyncio.Event()
        self._buf = bytearray()
        self._first = time.monotonic()
        self._digest = hashlib.sha256()
        self._plain = 0
        self._events = 0
        self._index = 0
        self._size = 0
        self._queue: asyncio.Queue[bytearray | None] = asyncio.Queue(QUEUE_CHUNKS)
        self._file: BinaryIO | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Make the file (0600, never an existing one) with its header and metadata frame; OSError if it cannot."""

        def make() -> BinaryIO:
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            f = os.fdopen(fd, "wb")
            try:
                data = file_header(self.id, self._key) + self._frame(json.dumps(self.meta, sort_keys=True).encode())
                write_all(f, data)
            except BaseException:
                f.close()
                self.path.unlink(missing_ok=True)
                raise
            self._size += len(data)
            return f

        self._file = await asyncio.to_thread(make)
        self._first = time.monotonic()
        self._task = asyncio.create_task(self._writer(), name=f"recording-{self.id}")

    def _frame(self, plaintext: bytes, final: bool = False) -> bytes:
        frame = seal_frame(self._key, self.id, self._index, plaintext, final)
        self._index += 1
        return frame

    async def add(self, direction: int, data: bytes) -> None:
        """One event, now. Waits only when ``QUEUE_CHUNKS`` chunks are already waiting for the disk."""
        if self.error is not None or not data:
            return
        buf = self._buf
        buf += EVENT.pack(direction, int((time.monotonic() - self._first) * 1e6), len(data))
        buf += data
        self._plain += EVENT.size + len(data)
        self._events += 1
        if len(buf) >= CHUNK_BYTES:
            self._buf = bytearray()
            await self._queue.put(buf)

    def queued(self) -> int:
        """Chunks waiting for the disk (never more than ``QUEUE_CHUNKS``)."""
        return self._queue.qsize()

    async def _writer(self) -> None:
        while True:
            try:
                chunk = await asyncio.wait_for(self._queue.get(), CHUNK_SECONDS)
            except TimeoutError:  # a quiet second: what the buffer holds goes to disk now
                if not self._buf:
                    continue
                chunk, self._buf = self._buf, bytearray()
            if chunk is None:
                return
            if self.error is None:
                await self._write(chunk, events=True)

    async def _write(self, plaintext: bytes | bytearray, final: bool = False, events: bool = False) -> None:
        """Seal and write one frame in a worker thread (and hash the events it holds there too)."""
        index = self._index
        self._index += 1
        f = self._file
        assert f is not None

        def work() -> int:
            if events:
                self._digest.update(plaintext)
            frame = seal_frame(self._key, self.id, index, plaintext, final)
            write_all(f, frame)
            return len(frame)

        try:
            self._size += await asyncio.to_thread(work)
        except OSError as e:
            self.error = f"the recording could not be written: {e.strerror or e}"
            self.failed.set()

    async def close(self) -> dict[str, Any]:
        """Write what is left and the final frame; the trailer (end, sizes, digest, error if any)."""
        if self._task is not None and not self._task.done():
            if self._buf:
                chunk, self._buf = self._buf, bytearray()
                await self._queue.put(chunk)
            await self._queue.put(None)
            await self._task
        trailer = {"ended": time.time(), "events": self._events, "plain_bytes": self._plain,
                   "sha256": self._digest.hexdigest(), "complete": self.error is None}  # fmt: skip
        f = self._file
        if f is not None:
            if self.error is None:
                await self._write(json.dumps(trailer, sort_keys=True).encode(), final=True)
            with contextlib.suppress(OSError):
                await asyncio.to_thread(_sync_close, f)
            self._file = None
        trailer["complete"] = self.error is None
        return {**trailer, "size": self._size, "error": self.error}


def _sync_close(f: BinaryIO) -> None:
    try:
        os.fsync(f.fileno())
    finally:
        f.close()


# -- reading ------------------------------------------------------------------------------------------


def read_header(f: BinaryIO) -> dict[str, Any]:
    if f.read(len(MAGIC)) != MAGIC:
        raise Conflict("not a kasou console recording (or a version this kasou does not read)")
    (n,) = struct.unpack(">H", f.read(2) or b"\0\0")
    try:
        head = json.loads(f.read(n))
    except ValueError:
        raise Conflict("the recording's header is damaged") from None
    if not isinstance(head, dict) or head.get("format") != FORMAT:
        raise Conflict("the recording's header is damaged")
    return head


def read_frames(f: BinaryIO, key: bytes, rec_id: str | None = None) -> Iterator[tuple[int, bytes, bool]]:
    """(index, plaintext, final) of every frame, each checked; Conflict on the first that is not right,
    and at the end if the final frame is missing (the file was cut short)."""
    head = read_header(f)
    rid = str(head.get("id"))
    if rec_id is not None and rid != rec_id:
        raise Conflict(f"the file holds recording {rid}, not {rec_id}")
    if head.get("key_id") != key_id(key):
        raise Conflict(f"the recording was sealed with secrets key {head.get('key_id')}, and this host's key is "
                       f"{key_id(key)}: every control-plane host needs the same secrets key")  # fmt: skip
    index = 0
    while True:
        fh = f.read(FRAME.size)
        if not fh:
            raise Conflict(f"recording {rid} ends after frame {index - 1} without its final frame: it was cut short")
        if len(fh) < FRAME.size:
            raise Conflict(f"recording {rid} is cut short inside frame {index}")
        n, final = FRAME.unpack(fh)
        if n < NONCE_BYTES + 16 or n > MAX_FRAME or final not in (0, 1):
            raise Conflict(f"frame {index} of recording {rid} is damaged")
        body = f.read(n)
        if len(body) < n:
            raise Conflict(f"recording {rid} is cut short inside frame {index}")
        try:
            plain = AESGCM(key).decrypt(body[:NONCE_BYTES], body[NONCE_BYTES:], associated(rid, index, bool(final)))
        except InvalidTag:
            raise Conflict(f"frame {index} of recording {rid} does not open: altered, moved or from another "
                           "recording") from None  # fmt: skip
        yield index, plain, bool(final)
        index += 1
        if final:
            if f.read(1):
                raise Conflict(f"recording {rid} has data after its final frame")
            return


def events(frames: Iterator[tuple[int, bytes, bool]]) -> Iterator[tuple[int, int, bytes]]:
    """(direction, microseconds, data) of every event in the frames after the metadata, up to the trailer."""
    for index, plain, final in frames:
        if index == 0 or final:
            continue
        pos = 0
        while pos < len(plain):
            if pos + EVENT.size > len(plain):
                raise Conflict(f"frame {index} holds a damaged event")
            direction, micros, n = EVENT.unpack_from(plain, pos)
            pos += EVENT.size
            yield direction, micros, plain[pos : pos + n]
            pos += n


def check(path: Path, key: bytes, rec_id: str | None = None) -> dict[str, Any]:
    """Read a whole recording: its metadata and trailer, and whether the events' digest is the trailer's.
    Conflict if any frame is wrong."""
    meta: dict[str, Any] = {}
    trailer: dict[str, Any] = {}
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for index, plain, final in read_frames(f, key, rec_id):
            if index == 0:
                meta = json.loads(plain)
            elif final:
                trailer = json.loads(plain)
            else:
                digest.update(plain)
    return {"meta": meta, "trailer": trailer, "sha256": digest.hexdigest(),
            "digest_ok": digest.hexdigest() == trailer.get("sha256")}  # fmt: skip
