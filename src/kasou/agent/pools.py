"""The storage pools a host knows of, and how full they are on this host.

The control plane tells the agent each pool's directory (with every usage query and disk
creation); the agent keeps the list in ``pools.json`` so that its disk API (which never touches a
path outside a disk directory) accepts the pools' directories after a restart too.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import stat
from pathlib import Path

from pydantic import BaseModel

from kasou.config import private_dir_mode
from kasou.errors import InvalidSpec, KasouError
from kasou.model.pools import DEFAULT_POOL, validate_pool_path
from kasou.model.spec import validate_name

log = logging.getLogger(__name__)

PRIVATE_UMASK = 0o077  # every agent: the files it and its QEMU and qemu-img make are root's only


def make_private(d: Path) -> int | None:
    """Force directory ``d`` to :func:`kasou.config.private_dir_mode` (0711 with QEMU confined, else 0700):
    its former mode if that let others in further (to be logged), else None.
    KasouError when it cannot (a file system that refuses chmod, e.g. a root-squashed NFS mount)."""
    want = private_dir_mode()
    try:
        old = stat.S_IMODE(d.stat().st_mode)
        if old & 0o077 == want & 0o077:
            return None
        os.chmod(d, (old & ~0o077) | want)
        if stat.S_IMODE(d.stat().st_mode) & 0o077 != want & 0o077:
            raise OSError(f"its mode stays {oct(stat.S_IMODE(d.stat().st_mode))}")
    except OSError as e:
        raise KasouError(f"cannot make {d} private to root ({oct(want)}): {e}; fix its mode or mount options") from None
    return old if old & 0o077 & ~want else None


class PoolRef(BaseModel):
    name: str
    path: str | None = None  # None: the built-in pool, this host's disk directory


class PoolUsage(BaseModel):
    """One pool on this host, measured now."""

    name: str
    path: str
    exists: bool
    writable: bool
    fs_total_bytes: int = 0
    fs_free_bytes: int = 0
    allocated_bytes: int = 0  # what the files under the pool's directory hold
    error: str | None = None


class PoolRegistry:
    def __init__(self, file: Path, default_dir: Path) -> None:
        self.file = file
        self.default_dir = default_dir
        self._refused: set[tuple[str, str]] = set()

    def _load(self) -> dict[str, str]:
        try:
            data = json.loads(self.file.read_text())
            return {str(k): str(v) for k, v in data.items()}
        except (OSError, ValueError, AttributeError):
            return {}

    def path_of(self, ref: PoolRef) -> Path:
        if ref.name == DEFAULT_POOL or ref.path is None:
            return self.default_dir
        return Path(ref.path)

    def register(self, refs: list[PoolRef]) -> None:
        """Remember these pools' directories (validated: names and absolute, normalised paths)."""
        known = self._load()
        changed = False
        for ref in refs:
            validate_name(ref.name, "pool")
            if ref.name == DEFAULT_POOL or ref.path is None:
                continue
            path = validate_pool_path(ref.path)
            if known.get(ref.name) != path:
                known[ref.name], changed = path, True
        if changed:
            self.file.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.file.with_suffix(".tmp")
            tmp.write_text(json.dumps(known, indent=1))
            tmp.replace(self.file)

    def forget(self, name: str) -> None:
        known = self._load()
        if known.pop(name, None) is not None:
            tmp = self.file.with_suffix(".tmp")
            tmp.write_text(json.dumps(known, indent=1))
            tmp.replace(self.file)

    def roots(self) -> list[Path]:
        """The pools' directories; one that is no longer allowed (outside the storage roots, over a system
        or kasou directory: a pools.json of before) is left out, and said so once."""
        out = []
        for name, p in self._load().items():
            try:
                out.append(Path(validate_pool_path(p)))
            except InvalidSpec as e:
                if (name, p) not in self._refused:
                    self._refused.add((name, p))
                    log.warning("pool %s is not a disk directory here: %s", name, e.message)
        return out


def usage(name: str, path: Path, create: bool = True) -> PoolUsage:
    """statvfs of the pool's file system and the bytes its files hold (sparse files count what they hold)."""
    if create:
        with contextlib.suppress(OSError):
            path.mkdir(parents=True, exist_ok=True)
    if not path.is_dir():
        return PoolUsage(name=name, path=str(path), exists=False, writable=False, error=f"{path} is not a directory")
    try:
        make_private(path)  # a pool holds guests' disks: root's only, like the disk directory
    except KasouError as e:
        return PoolUsage(name=name, path=str(path), exists=True, writable=False, error=e.message)
    try:
        st = os.statvfs(path)
    except OSError as e:
        return PoolUsage(name=name, path=str(path), exists=True, writable=False, error=str(e))
    allocated = 0
    for root, _dirs, files in os.walk(path):
        for f in files:
            with contextlib.suppress(OSError):
                allocated += os.lstat(os.path.join(root, f)).st_blocks * 512
    return PoolUsage(
        name=name,
        path=str(path),
        exists=True,
        writable=os.access(path, os.W_OK),
        fs_total_bytes=st.f_blocks * st.f_frsize,
        fs_free_bytes=st.f_bavail * st.f_frsize,
        allocated_bytes=allocated,
    )
