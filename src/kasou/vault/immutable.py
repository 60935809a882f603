"""``chattr +i`` from Python: the FS_IOC_GETFLAGS / FS_IOC_SETFLAGS ioctls.

An immutable file cannot be written, renamed, linked or removed, not even by root, until the flag is
cleared (which needs CAP_LINUX_IMMUTABLE, i.e. root on the backup server itself). File systems that do
not support the flag answer the ioctl with an error: :func:`probe` tells whether a directory's does.
"""

from __future__ import annotations

import array
import contextlib
import fcntl
import os
from pathlib import Path

FS_IOC_GETFLAGS = 0x80086601
FS_IOC_SETFLAGS = 0x40086602
FS_IMMUTABLE_FL = 0x10


def _flags(fd: int) -> int:
    buf = array.array("i", [0])
    fcntl.ioctl(fd, FS_IOC_GETFLAGS, buf, True)
    return int(buf[0])


def _set_flags(fd: int, flags: int) -> None:
    fcntl.ioctl(fd, FS_IOC_SETFLAGS, array.array("i", [flags]), False)


def set_immutable(path: Path, on: bool = True) -> bool:
    """Set (or clear) the immutable flag of a file; False where its file system does not support it."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return False
    try:
        flags = _flags(fd)
        want = flags | FS_IMMUTABLE_FL if on else flags & ~FS_IMMUTABLE_FL
        if want != flags:
            _set_flags(fd, want)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def is_immutable(path: Path) -> bool:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return False
    try:
        return bool(_flags(fd) & FS_IMMUTABLE_FL)
    except OSError:
        return False
    finally:
        os.close(fd)


def probe(directory: Path) -> bool:
    """Whether files in ``directory`` can be made immutable: set the flag on a scratch file, check that it
    holds (an unlink is refused), clear it and remove the file."""
    path = directory / f".immutable-probe-{os.getpid()}"
    path.write_bytes(b"")
    try:
        if not set_immutable(path, True) or not is_immutable(path):
            return False
        try:
            os.unlink(path)
        except PermissionError:
            return True
        return False  # removed although flagged: the file system ignores the flag
    finally:
        set_immutable(path, False)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def release_tree(root: Path) -> int:
    """Clear the flag on every file under ``root`` (before removing a tree on purpose: pruning, tests)."""
    n = 0
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            p = Path(dirpath) / name
            if is_immutable(p):
                set_immutable(p, False)
                n += 1
    return n
