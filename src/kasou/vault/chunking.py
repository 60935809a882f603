"""Raw disk images as 4 MiB chunks, and back (docs/backup-server.md, "A chunk").

:func:`split` reads an image chunk by chunk: a chunk of zeros becomes ``None`` in the index, any other its
chunk id and plaintext. Given the previous index and the chunks that changed since (a dirty bitmap), it
reads only those and takes the others' ids from the previous index. :func:`write_image` is the reverse: a
sparse raw file, zero chunks left as holes.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Container, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from kasou.errors import AlreadyExists, BackupCorrupt, ImageError, InvalidSpec
from kasou.vault.crypt import CHUNK_SIZE, BackupKey, PublicBackupKey, chunk_id

Source = str | Path | BinaryIO
_ZEROS = bytes(CHUNK_SIZE)


@dataclass(frozen=True, slots=True)
class Chunk:
    """One chunk of a disk: ``id`` None for all zeros; ``data`` the plaintext, None for zeros and for a chunk
    reused from the previous index; ``read`` whether it was read from the image."""

    index: int
    id: str | None
    data: bytes | None
    read: bool = True


def chunk_count(size: int, chunk_size: int = CHUNK_SIZE) -> int:
    return -(-size // chunk_size)


def chunk_length(size: int, index: int, chunk_size: int = CHUNK_SIZE) -> int:
    """How many bytes of the disk chunk ``index`` holds (the last one may be shorter)."""
    return max(0, min(chunk_size, size - index * chunk_size))


def is_zero(data: bytes) -> bool:
    return data == (_ZEROS if len(data) == CHUNK_SIZE else bytes(len(data)))


@contextlib.contextmanager
def opened(source: Source) -> Iterator[BinaryIO]:
    """A binary reader of ``source``: a path is opened (and closed after), a reader is used as it is."""
    if isinstance(source, str | Path):
        try:
            f = open(source, "rb")  # noqa: SIM115 - closed below
        except OSError as e:
            raise InvalidSpec(f"cannot read the disk image {source}: {e.strerror}") from None
        with f:
            yield f
    else:
        yield source


def read_chunk(f: BinaryIO, index: int, size: int) -> bytes:
    """Chunk ``index`` of the image ``f`` of ``size`` bytes (seeks to it)."""
    f.seek(index * CHUNK_SIZE)
    want = chunk_length(size, index)
    parts = []
    got = 0
    while got < want:
        part = f.read(want - got)
        if not part:
            raise InvalidSpec(f"the disk image ends at byte {index * CHUNK_SIZE + got}, before its size {size}")
        parts.append(part)
        got += len(part)
    return parts[0] if len(parts) == 1 else b"".join(parts)


def _reusable(index: int, size: int, previous: Sequence[str | None], previous_size: int | None) -> bool:
    """Whether chunk ``index`` may be taken from the previous index when it did not change: it must exist
    there and cover the same bytes (a disk that grew has a longer last chunk than before)."""
    if index >= len(previous):
        return False
    if previous_size is None or previous_size == size:
        return True
    return (index + 1) * CHUNK_SIZE <= min(size, previous_size)


def split(
    source: Source,
    size: int,
    key: PublicBackupKey | BackupKey,
    *,
    previous: Sequence[str | None] | None = None,
    previous_size: int | None = None,
    changed: Container[int] | None = None,
) -> Iterator[Chunk]:
    """Every chunk of the image ``source`` of ``size`` bytes, in order.

    With ``previous`` (the previous index's chunk list for this disk, whose disk had ``previous_size``
    bytes) and ``changed`` (the indices of the chunks written since), only changed chunks are read; the
    others get their id from ``previous`` (``data`` None). Without ``changed`` every chunk is read.
    """
    if size < 0:
        raise InvalidSpec(f"a disk's size cannot be negative ({size})")
    with opened(source) as f:
        for index in range(chunk_count(size)):
            unchanged = previous is not None and changed is not None and index not in changed
            if unchanged and previous is not None and _reusable(index, size, previous, previous_size):
                yield Chunk(index, previous[index], None, read=False)
                continue
            data = read_chunk(f, index, size)
            yield Chunk(index, None, None) if is_zero(data) else Chunk(index, chunk_id(key, data), data)


def write_image(
    dest: str | Path,
    size: int,
    chunks: Sequence[str | None],
    fetch: Callable[[str], bytes],
    chunk_size: int = CHUNK_SIZE,
) -> int:
    """Write the raw image ``chunks`` describes to the new file ``dest``, sparse (a ``None`` chunk stays a hole);
    ``fetch(id)`` gives a chunk's plaintext, fetched once however often it occurs. Returns the bytes written.

    The file is made beside ``dest`` and renamed at the end: a failure leaves nothing behind."""
    dest = Path(dest)
    if len(chunks) != chunk_count(size, chunk_size):
        raise InvalidSpec(
            f"an image of {size} bytes has {chunk_count(size, chunk_size)} chunks, the index {len(chunks)}"
        )
    if dest.exists():
        raise AlreadyExists(f"{dest} exists; a restore writes a new file")
    where: dict[str, list[int]] = {}
    for index, cid in enumerate(chunks):
        if cid is not None:
            where.setdefault(cid, []).append(index)
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.partial")
    written = 0
    try:
        with open(tmp, "xb") as f:
            f.truncate(size)
            for cid, indices in where.items():
                data = fetch(cid)
                for index in indices:
                    want = chunk_length(size, index, chunk_size)
                    if len(data) != want:
                        raise BackupCorrupt(f"chunk {index} ({cid[:12]}…) holds {len(data)} bytes, not {want}",
                                            chunk=cid)  # fmt: skip
                    f.seek(index * chunk_size)
                    f.write(data)
                    written += want
            f.flush()
            os.fsync(f.fileno())
        _link_new(tmp, dest)
    except OSError as e:
        raise ImageError(f"cannot write {dest}: {e.strerror or e}") from None
    finally:
        tmp.unlink(missing_ok=True)
    return written


def _link_new(tmp: Path, dest: Path) -> None:
    try:
        os.link(tmp, dest)  # never replaces a file that appeared meanwhile
    except FileExistsError:
        raise AlreadyExists(f"{dest} exists; a restore writes a new file") from None
