"""One file read out of a disk image's file systems, read-only (a single file restored from a backup).

The raw image's partition table (GPT or MBR) is read by ``sfdisk``; each partition in turn (or the whole image,
when it has no table) is attached as a read-only loop device of its own (``losetup --offset --sizelimit``: no
kernel partition scan, no udev) and mounted read-only (ext4 without replaying its journal: ``noload``) in a
private directory until one holds the path. The path is resolved inside that mount only: a
symbolic link in the guest's file system that points outside it is refused, never followed onto the host. The
mounts and the loop devices are undone however it ends; every step is bounded in time.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

from kasou.errors import ImageError, InvalidSpec, NotFound, TooLarge

STEP_TIMEOUT_S = 60.0
MAX_BYTES = 256 << 20


def _run(*argv: str) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(list(argv), capture_output=True, text=True, timeout=STEP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise ImageError(f"{argv[0]} did not finish within {STEP_TIMEOUT_S:.0f} s") from None


def guest_path(path: str) -> PurePosixPath:
    """An absolute path in the guest, without ``..``."""
    p = PurePosixPath(path)
    if not p.is_absolute() or ".." in p.parts or len(str(p)) > 4096 or "\x00" in path:
        raise InvalidSpec(f"{path[:100]!r} is not an absolute path in the guest (without '..')", field="path")
    return p


def read_file(image: Path, path: str, limit: int = MAX_BYTES) -> bytes:
    """The bytes of ``path`` in one of ``image``'s file systems (a raw image). NotFound if none holds it."""
    want = guest_path(path)
    tried: list[str] = []
    whole: list[tuple[int, int | None]] = [(0, None)]  # no table: one file system on the whole disk
    for offset, size in partitions(image) or whole:
        with _attached(image, offset, size) as dev, tempfile.TemporaryDirectory(prefix="guestfile-") as mnt:
            if not _mount(dev, mnt):
                continue
            tried.append(dev)
            try:
                found = _inside(Path(mnt), want)
                if found is not None:
                    n = found.stat().st_size
                    if n > limit:
                        raise TooLarge(f"{path} is {n} bytes; at most {limit} are restored this way")
                    return found.read_bytes()
            finally:
                _run("umount", mnt)
    where = f"its file systems ({len(tried)} mounted)" if tried else "it (no file system could be mounted)"
    raise NotFound(f"{path} is not in {where}")


def partitions(image: Path) -> list[tuple[int, int]]:
    """The partitions of ``image``'s table (GPT or MBR) as (offset, size) in bytes, read by ``sfdisk`` (not by
    the kernel: a host kernel built without partition support, or a container without partition device nodes,
    reads them the same). [] when the image has no partition table (one file system on the whole disk)."""
    r = _run("sfdisk", "--json", str(image))
    if r.returncode != 0:
        return []
    try:
        table = json.loads(r.stdout)["partitiontable"]
        sector = int(table.get("sectorsize", 512))
        return [(int(p["start"]) * sector, int(p["size"]) * sector) for p in table.get("partitions", [])]
    except (ValueError, KeyError, TypeError):
        raise ImageError(f"cannot read the partition table of {image.name}") from None


@contextlib.contextmanager
def _attached(image: Path, offset: int, size: int | None) -> Iterator[str]:
    """A read-only loop device of ``image`` from ``offset`` (``size`` bytes, or to its end), detached after."""
    argv = ["losetup", "--find", "--show", "--read-only", "--offset", str(offset)]
    if size is not None:
        argv += ["--sizelimit", str(size)]
    r = _run(*argv, str(image))
    if r.returncode != 0:
        raise ImageError(f"cannot attach {image.name} read-only: {r.stderr.strip()[-200:]}")
    loop = r.stdout.strip()
    try:
        yield loop
    finally:
        _run("losetup", "--detach", loop)


def _mount(dev: str, mnt: str) -> bool:
    """Read-only: ext3/4 without replaying the journal (``noload``), else any other file system."""
    return any(_run("mount", "-o", opts, dev, mnt).returncode == 0 for opts in ("ro,noload", "ro"))


def _inside(root: Path, want: PurePosixPath) -> Path | None:
    """``want`` under ``root``, only if it is a regular file that resolves inside ``root``."""
    candidate = root.joinpath(*want.parts[1:])
    with contextlib.suppress(OSError):
        real = Path(os.path.realpath(candidate))
        inside = root.resolve() in real.parents
        if inside and real.is_file():
            return real
        if (candidate.is_symlink() or candidate.exists()) and not inside:
            raise InvalidSpec(f"{want} leads outside the guest's file system (a symbolic link)", field="path")
    return None
