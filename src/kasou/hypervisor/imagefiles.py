"""Backup generation files with ``qemu-img``: make, check, digest, merge. Every call is bounded.

The *content digest* of an image is what the guest sees, independent of how the
file stores it: the image is read through its whole backing chain (``qemu-img
convert`` to a sparse raw scratch file), and the SHA-256 runs over the virtual
size and, for every 64 KiB block that is not all zeros, its index and bytes. Two
images with the same guest-visible content have the same digest whatever their
allocation, and reading the holes of the scratch file costs nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from kasou.errors import ImageError, OperationTimeout

QEMU_IMG_TIMEOUT = 1800.0
BLOCK = 64 * 1024
_ZERO = bytes(BLOCK)
DIGEST_PREFIX = "sha256-nz64k:"  # the name of the digest's method, kept with every digest


async def run(*argv: str, timeout: float = QEMU_IMG_TIMEOUT, ok: tuple[int, ...] = (0,)) -> str:
    """Run ``qemu-img`` (or another tool); its last error line becomes an ImageError."""
    proc = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except (TimeoutError, asyncio.CancelledError):
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        raise OperationTimeout(f"{argv[0]} {argv[1]} did not finish within {timeout:.0f} s") from None
    if proc.returncode not in ok:
        lines = [ln for ln in (err or out).decode(errors="replace").splitlines() if ln.strip()]
        msg = lines[-1] if lines else f"exit status {proc.returncode}"
        raise ImageError(msg.removeprefix("qemu-img: "))
    return out.decode()


async def info(path: Path | str, chain: bool = False) -> Any:
    args = ["qemu-img", "info", "--output=json", "-U", *(["--backing-chain"] if chain else []), str(path)]
    return json.loads(await run(*args, timeout=60))


async def create(path: Path, size_bytes: int, backing: str | None = None) -> None:
    """A new qcow2 (refuses an existing file); ``backing`` is written as given (relative: to ``path``'s directory)."""
    if path.exists():
        raise ImageError(f"{path} already exists")
    path.parent.mkdir(parents=True, exist_ok=True)
    extra = ["-b", backing, "-F", "qcow2"] if backing is not None else []
    await run("qemu-img", "create", "-q", "-f", "qcow2", *extra, str(path), str(size_bytes), timeout=60)


async def check(path: Path | str) -> None:
    """``qemu-img check`` of one file (not its backing): any corruption is an ImageError; leaked clusters are not."""
    try:
        # 3: only leaked clusters (space, not data); 2: corruption; 1: the check could not run.
        await run("qemu-img", "check", "-q", "-f", "qcow2", str(path), timeout=600, ok=(0, 3))
    except ImageError as e:
        raise ImageError(f"{path}: {e.message}") from None


async def check_chain(path: Path | str) -> list[str]:
    """Check every file of the chain from ``path`` down; returns the files, top first."""
    try:
        files = [str(i.get("filename")) for i in await info(path, chain=True)]
    except ImageError as e:
        raise ImageError(f"{path}: {e.message}") from None
    for f in files:
        await check(f)
    return files


def digest_raw(raw: Path, size: int) -> str:
    """The content digest (see the module notes) of a sparse raw file of ``size`` bytes, holes skipped."""
    h = hashlib.sha256()
    h.update(f"{size}\n".encode())
    with open(raw, "rb") as f:
        fd = f.fileno()
        pos = 0
        while pos < size:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:  # ENXIO: only a hole remains
                break
            end = os.lseek(fd, start, os.SEEK_HOLE)
            block = start - start % BLOCK
            f.seek(block)
            while block < end:
                chunk = f.read(BLOCK)
                if not chunk:
                    break
                if chunk.rstrip(b"\0"):
                    h.update(block.to_bytes(8, "big"))
                    h.update(chunk.ljust(BLOCK, b"\0"))
                block += BLOCK
            pos = block
    return DIGEST_PREFIX + h.hexdigest()


async def digest(path: Path | str, scratch: Path, fmt: str = "qcow2") -> str:
    """The content digest of the image at ``path`` read through its chain (see the module notes)."""
    scratch.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=".digest-", suffix=".raw", dir=scratch)
    os.close(fd)
    raw = Path(name)
    try:
        size = int((await info(path))["virtual-size"])
        await run("qemu-img", "convert", "-q", "-U", "-f", fmt, "-O", "raw", "-S", "4k", str(path), str(raw))
        return await asyncio.to_thread(digest_raw, raw, size)
    finally:
        raw.unlink(missing_ok=True)


async def convert(src: Path | str, dest: Path, src_fmt: str = "qcow2") -> None:
    """A thin, self-contained qcow2 copy of ``src`` read through its chain (no backing, no bitmaps)."""
    if dest.exists():
        raise ImageError(f"{dest} already exists")
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        await run("qemu-img", "convert", "-q", "-U", "-f", src_fmt, "-O", "qcow2", str(src), str(dest))
    except BaseException:
        dest.unlink(missing_ok=True)
        raise


async def offline_incremental(src: Path | str, src_fmt: str, dest: Path, backing: str) -> None:
    """An incremental generation of a disk no one writes: only the blocks that differ from ``backing``.

    ``dest`` first is an empty overlay of the disk itself, then a safe ``qemu-img
    rebase`` onto the previous generation compares the two and copies into it
    every range where they differ. No dirty bitmap is needed: it compares content.
    """
    if dest.exists():
        raise ImageError(f"{dest} already exists")
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        await run("qemu-img", "create", "-q", "-f", "qcow2", "-b", str(Path(src).absolute()), "-F", src_fmt, str(dest))
        await run("qemu-img", "rebase", "-q", "-f", "qcow2", "-b", backing, "-F", "qcow2", str(dest))
    except BaseException:
        dest.unlink(missing_ok=True)
        raise


async def bitmaps(path: Path | str) -> list[str]:
    """The persistent dirty bitmaps stored in a qcow2 file."""
    data = await info(path)
    specific = (data.get("format-specific") or {}).get("data") or {}
    return [str(b["name"]) for b in specific.get("bitmaps", []) if b.get("name")]


async def set_bitmaps(path: Path | str, keep: str | None, prefix: str) -> None:
    """Leave ``keep`` as the only bitmap starting with ``prefix`` in a qcow2 no QEMU has open (adds it if missing)."""
    present = await bitmaps(path)
    for name in present:
        if name.startswith(prefix) and name != keep:
            await run("qemu-img", "bitmap", "--remove", "-f", "qcow2", str(path), name, timeout=120)
    if keep is not None and keep not in present:
        await run("qemu-img", "bitmap", "--add", "-f", "qcow2", str(path), keep, timeout=120)


async def merge_into_child(oldest: Path, child: Path) -> None:
    """Make ``child`` (whose backing file is ``oldest``) self-contained and drop ``oldest``.

    ``qemu-img commit -d`` writes the child's own clusters into ``oldest`` (cost:
    the child's delta, not the whole disk) and leaves the child untouched, so what
    the child shows never changes; then ``oldest`` takes the child's name in one
    rename. A crash before the rename leaves the child as it was.
    """
    await run("qemu-img", "commit", "-q", "-d", "-f", "qcow2", str(child))
    os.replace(oldest, child)


def remove(path: Path) -> None:
    path.unlink(missing_ok=True)
    Path(f"{path}.json").unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        path.parent.rmdir()


def write_manifest(path: Path, data: dict[str, Any]) -> None:
    """The record of a generation beside its file (``<file>.json``): the backup directory describes itself."""
    tmp = Path(f"{path}.json.tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, f"{path}.json")


async def restore_verified(src: Path | str, dest: Path, expect: str, scratch: Path, fmt: str = "qcow2") -> None:
    """Make ``dest`` (a new self-contained qcow2, or raw) from ``src``'s chain only if its content digest is
    ``expect``.

    The bytes that are checked are the bytes that are written: ``src`` is read once
    into a raw scratch file, digested, and only then converted into ``dest``.
    """
    if dest.exists():
        raise ImageError(f"{dest} already exists")
    scratch.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=".restore-", suffix=".raw", dir=scratch)
    os.close(fd)
    raw = Path(name)
    try:
        size = int((await info(src))["virtual-size"])
        await run("qemu-img", "convert", "-q", "-U", "-f", "qcow2", "-O", "raw", "-S", "4k", str(src), str(raw))
        got = await asyncio.to_thread(digest_raw, raw, size)
        if got != expect:
            raise ImageError(f"{src} does not hold what was backed up: content digest {got}, recorded {expect}")
        dest.parent.mkdir(parents=True, exist_ok=True)
        try:
            await run("qemu-img", "convert", "-q", "-f", "raw", "-O", fmt, str(raw), str(dest))
        except BaseException:
            dest.unlink(missing_ok=True)
            raise
    finally:
        raw.unlink(missing_ok=True)
