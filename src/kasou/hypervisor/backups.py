"""What a driver is asked and answers for a backup of a running VM's disks (see :meth:`Driver.backup_disks`).

A backup generation of one disk is a qcow2 file. A *full* one holds the whole
disk; an *incremental* one holds only what changed since the previous generation
and names that generation's file as its backing file (a relative name, so a
backup directory can be copied elsewhere whole). Either restores by itself
through its chain.

Running VMs track changes with QEMU persistent dirty bitmaps named
``kasou-bk-<generation id>``: the bitmap named after generation G records every
write since G's point in time, so an incremental backup after G copies exactly
the clusters it marks. The names make a wrong incremental impossible: a bitmap
that does not carry the name of the latest recorded generation is never used.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from kasou.errors import InvalidSpec

BITMAP_PREFIX = "kasou-bk-"
_ID_RE = re.compile(r"^[a-z0-9]{4,16}$")

BackupKind = Literal["full", "incremental"]


def bitmap_name(backup_id: str) -> str:
    """The dirty bitmap that records the writes since backup ``backup_id``."""
    if not _ID_RE.fullmatch(backup_id):
        raise InvalidSpec(f"backup id {backup_id!r} must be 4 to 16 lower-case letters or digits", field="id")
    return BITMAP_PREFIX + backup_id


class BackupDisk(BaseModel):
    """One disk to back up: where to write it, and what it may be incremental to."""

    model_config = ConfigDict(extra="forbid")

    disk_id: str
    target: str  # the new generation's file; must not exist; the driver makes it
    backing: str | None = None  # the previous generation's file: incremental to it if the bitmap allows
    base_bitmap: str | None = None  # the bitmap named after the previous generation
    new_bitmap: str  # the bitmap to start now, named after this generation
    speed_bytes_s: int | None = Field(default=None, gt=0)  # limit the copy (None: as fast as the disks go)


class BackupDiskResult(BaseModel):
    disk_id: str
    kind: BackupKind
    target: str
    backing: str | None  # the previous generation's file, for an incremental
    bitmap: str | None  # the bitmap recording writes since this backup (None: none could be kept)
    bytes_copied: int = Field(ge=0)  # guest data the backup job copied
    note: str = ""  # why an incremental request became a full backup, or how it was made
    # application: the guest's file systems were frozen by its agent at the point in time; crash: no agent
    # answered (as after a power cut); None: not from a running guest
    consistency: Literal["application", "crash"] | None = None
