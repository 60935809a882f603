"""Storage pools: named places for disk images, with a capacity and an over-commit limit.

A pool is a directory: on each host (``shared: false``: every host has its own at that path, e.g.
each server's SSD array mounted at ``/srv/ssd``) or on storage all hosts see at the same path
(``shared: true``: NFS, a SAN file system). Disks are thin: a disk's *provisioned* size is its
virtual size, its *allocated* size what its file holds. The pool refuses a disk that would take
the provisioned total past ``capacity * overcommit``; with the default over-commit of 1.0 a pool
can never fill up, whatever its guests write.

The built-in pool ``default`` is each host's disk directory (``$KASOU_HOME/disks``).
"""

from __future__ import annotations

import math
import os
from pathlib import PurePosixPath
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt

from kasou.config import DEFAULT_HOME, Paths, storage_roots
from kasou.errors import InvalidSpec
from kasou.model.names import validate_name
from kasou.model.parsing import parse_model
from kasou.model.units import parse_size

DEFAULT_POOL = "default"
DEFAULT_POOL_OVERCOMMIT = 4.0  # the built-in pool: thin images, many VMs, on the host's own disk
MAX_OVERCOMMIT = 100.0
DEFAULT_WARN_FREE_PCT = 10


class PoolCreate(BaseModel):
    """What ``kasou pool create`` and ``POST /v1/pools`` take."""

    model_config = ConfigDict(extra="forbid")

    name: str
    path: str
    shared: bool = False
    capacity: str | StrictInt | None = None  # e.g. "500G"; default: the size of the file system at path
    overcommit: StrictFloat | StrictInt = 1.0  # provisioned may reach capacity * this
    warn_free_pct: StrictInt = Field(DEFAULT_WARN_FREE_PCT)  # warn when less than this share of capacity is free
    description: str = Field("", max_length=500)

    @classmethod
    def parse(cls, data: Any) -> PoolCreate:
        spec: PoolCreate = parse_model(cls, data)
        spec.check()
        return spec

    def check(self) -> None:
        validate_name(self.name, "pool")
        if self.name == DEFAULT_POOL:
            raise InvalidSpec(f"pool name {DEFAULT_POOL!r} is taken by the built-in pool", field="pool")
        self.path = validate_pool_path(self.path)
        if self.capacity is not None:
            parse_size(self.capacity, "capacity")
        if not (math.isfinite(self.overcommit) and 1.0 <= self.overcommit <= MAX_OVERCOMMIT):
            raise InvalidSpec(f"overcommit must be between 1.0 and {MAX_OVERCOMMIT:g}, not {self.overcommit}",
                              field="overcommit")  # fmt: skip
        if not 0 <= self.warn_free_pct <= 90:
            raise InvalidSpec(
                f"warn_free_pct must be between 0 and 90, not {self.warn_free_pct}", field="warn_free_pct"
            )

    @property
    def capacity_bytes(self) -> int | None:
        return None if self.capacity is None else parse_size(self.capacity, "capacity")


# Never a pool, nor inside one, nor holding one: the system's own directories.
SYSTEM_DIRS = ("/bin", "/boot", "/dev", "/etc", "/lib", "/lib32", "/lib64", "/libx32", "/proc", "/root", "/run",
               "/sbin", "/sys", "/usr")  # fmt: skip


def _storage_roots() -> list[str]:
    try:
        return storage_roots()
    except ValueError as e:
        raise InvalidSpec(str(e), field="path") from None


def _kasou_dirs() -> list[tuple[str, str]]:
    """kasou's own directories on this host (what it names them), which no pool may overlap."""
    paths = Paths.from_env()
    dirs = [("kasou's own directory", str(DEFAULT_HOME)), ("the kasou home (KASOU_HOME)", str(paths.home)),
            ("the images directory (KASOU_IMAGES)", str(paths.images)),
            ("the TLS directory (KASOU_TLS_DIR)", str(paths.tls_dir))]  # fmt: skip
    return [(what, str(PurePosixPath(os.path.normpath(d)))) for what, d in dirs]


def validate_pool_path(path: object) -> str:
    """An absolute, normalised directory path with no '..', under one of the storage roots
    (``KASOU_STORAGE_ROOTS``), and clear of the system's and kasou's own directories."""
    if not isinstance(path, str) or not path:
        raise InvalidSpec("path must be an absolute directory path", field="path")
    p = PurePosixPath(path)
    if not p.is_absolute() or ".." in p.parts or "\n" in path or "," in path:
        raise InvalidSpec(f"path {path!r} must be absolute, without '..', commas or newlines", field="path")
    norm = str(p)
    roots = _storage_roots()
    if norm == "/":
        raise InvalidSpec("path / is a system directory; give a directory of its own", field="path")
    for d in SYSTEM_DIRS:
        if overlaps(norm, d):
            raise InvalidSpec(f"path {norm} overlaps the system directory {d}; give a directory of its own under "
                              f"the storage roots ({', '.join(roots)})", field="path")  # fmt: skip
    for what, d in _kasou_dirs():
        # the default home itself, or a directory holding it; under it only what the roots allow (a lab's pools)
        whole = what != "kasou's own directory" or not _inside(norm, d)
        if overlaps(norm, d) and whole:
            raise InvalidSpec(f"path {norm} overlaps {what} {d}; give a directory of its own under "
                              f"the storage roots ({', '.join(roots)})", field="path")  # fmt: skip
    if not any(norm == r or _inside(norm, r) for r in roots):
        raise InvalidSpec(f"path {norm} is outside the storage roots ({', '.join(roots)}); make the pool under one "
                          "of them, or add a root with KASOU_STORAGE_ROOTS on every host", field="path")  # fmt: skip
    return norm


def _inside(a: str, b: str) -> bool:
    """Whether directory ``a`` is strictly inside ``b``."""
    return PurePosixPath(b) in PurePosixPath(a).parents


def overlaps(a: str, b: str) -> bool:
    """Whether one directory is the other or inside it."""
    pa, pb = PurePosixPath(a), PurePosixPath(b)
    return pa == pb or pa in pb.parents or pb in pa.parents
