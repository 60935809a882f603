"""One file read out of a disk image's file systems, read-only (a single file restored from a backup).

The raw image is attached as a read-only loop device with its partitions (``losetup --read-only --partscan``);
each partition (or the whole device, when it has none) is mounted read-only (ext4 without replaying its journal:
``noload``) in a private directory until one holds the path. The path is resolved inside that mount only: a
symbolic link in the guest's file system that points outside it is refused, never followed onto the host. The
mounts and the loop device are undone however it ends; every step is bounded in time.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import tempfile
import time
from pathlib import Path, PurePosixPath

from kasou.errors import ImageError, InvalidSpec, NotFound, TooLarge

STEP_TIMEOUT_S = 60.0
MAX_BYTES = 256 << 20
PARTITION_WAIT_S = 10.0


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
    r = _run("losetup", "--find", "--show", "--read-only", "--partscan", str(image))
    if r.returncode != 0:
        raise ImageError(f"cannot attach {image.name} read-only: {r.stderr.strip()[-200:]}")
    loop = r.stdout.strip()
    tried: list[str] = []
    try:
        parts = _partitions(loop)
        for dev in parts or [loop]:
            with tempfile.TemporaryDirectory(prefix="guestfile-") as mnt:
                if not _mount(dev, mnt):
                    continue
                tried.append(dev)
                try:
                    found = _inside(Path(mnt), want)
                    if found is not None:
                        size = found.stat().st_size
                        if size > limit:
                            raise TooLarge(f"{path} is {size} bytes; at most {limit} are restored this way")
                        return found.read_bytes()
                finally:
                    _run("umount", mnt)
    finally:
        _run("losetup", "--detach", loop)
    where = f"its file systems ({len(tried)} mounted)" if tried else "it (no file system could be mounted)"
    raise NotFound(f"{path} is not in {where}")


def _partitions(loop: str) -> list[str]:
    """The partitions the kernel found on ``loop`` (its sysfs entries: ``losetup --partscan`` has scanned them
    when it returns), once their device nodes are there (devtmpfs makes them; no udev needed). Bounded."""
    name = Path(loop).name
    deadline = time.monotonic() + PARTITION_WAIT_S
    while True:
        devs = [f"/dev/{p.name}" for p in sorted(Path("/sys/block", name).glob(f"{name}p*"))]
        if all(Path(d).exists() for d in devs) or time.monotonic() > deadline:
            return [d for d in devs if Path(d).exists()]
        time.sleep(0.05)


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
