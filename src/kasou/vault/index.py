"""A generation's index (the wire format of docs/backup-server.md) as the server checks it.

The index is plain JSON chosen by the client; the server checks its names, numbers and chunk ids before
it keeps it, and never rewrites it. What the server adds lives in its own state (:data:`STATE_KEYS`),
so an index may not use those names.
"""

from __future__ import annotations

import math
import re
from typing import Any

from kasou.errors import InvalidSpec
from kasou.model.names import validate_name

CHUNK_ID_RE = re.compile(r"^[0-9a-f]{64}$")
# A disk id as kasou's driver accepts it (kasou.hypervisor.base): the backup server does not import the driver.
DISK_ID_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,21}$")
FINGERPRINT_RE = re.compile(r"^[0-9a-f]{16}$")
CHUNK_SIZE = 4 * 1024 * 1024
MAX_BLOB = 8 * 1024 * 1024
MAGIC = b"KSC1"
MAX_GENERATION = 999_999  # the file name is <gen:06d>.json
MAX_DISKS = 64
STATE_KEYS = ("received", "locked_until", "verified_at", "damaged", "copied_to", "synced_from")


def validate_chunk_id(chunk_id: object, what: str = "chunk id") -> str:
    if not isinstance(chunk_id, str) or not CHUNK_ID_RE.fullmatch(chunk_id):
        raise InvalidSpec(f"{what} must be 64 lowercase hex digits, not {str(chunk_id)[:80]!r}", field="chunk_id")
    return chunk_id


def validate_disk_id(disk_id: object) -> str:
    if not isinstance(disk_id, str) or not DISK_ID_RE.fullmatch(disk_id):
        raise InvalidSpec(
            f"disk id {str(disk_id)[:40]!r} must start with a letter and have at most 22 letters, digits, '-' or '_'",
            field="disk_id",
        )
    return disk_id


def validate_generation(generation: object) -> int:
    if isinstance(generation, bool) or not isinstance(generation, int) or not 0 <= generation <= MAX_GENERATION:
        raise InvalidSpec(f"generation must be a whole number from 0 to {MAX_GENERATION}", field="generation")
    return generation


def _count(index: dict[str, Any], key: str) -> int:
    v = index.get(key)
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise InvalidSpec(f"{key} must be a whole number ≥ 0", field=key)
    return v


def validate_index(index: object) -> dict[str, Any]:
    """Check a generation's index; return it unchanged, or raise InvalidSpec naming the first fault."""
    if not isinstance(index, dict):
        raise InvalidSpec("a generation's index must be a JSON object", field="body")
    for key in STATE_KEYS:
        if key in index:
            raise InvalidSpec(f"{key} is the server's to set, not part of an index", field=key)
    validate_name(index.get("vm"), "vm")
    validate_generation(index.get("generation"))
    if not isinstance(index.get("vm_uuid"), str) or not 0 < len(index["vm_uuid"]) <= 64:
        raise InvalidSpec("vm_uuid must be a string of 1 to 64 characters", field="vm_uuid")
    created = index.get("created")
    if isinstance(created, bool) or not isinstance(created, (int, float)) or not math.isfinite(created):
        raise InvalidSpec("created must be a time in seconds since the epoch", field="created")
    if not isinstance(index.get("key_fingerprint"), str) or not FINGERPRINT_RE.fullmatch(index["key_fingerprint"]):
        raise InvalidSpec("key_fingerprint must be 16 lowercase hex digits", field="key_fingerprint")
    chunk_size = _count(index, "chunk_size")
    if not 0 < chunk_size <= MAX_BLOB:
        raise InvalidSpec(f"chunk_size must be from 1 to {MAX_BLOB} bytes", field="chunk_size")
    _count(index, "bytes_sent")
    _count(index, "bytes_logical")
    validate_chunk_id(index.get("config"), "config")
    disks = index.get("disks")
    if not isinstance(disks, list) or len(disks) > MAX_DISKS:
        raise InvalidSpec(f"disks must be a list of at most {MAX_DISKS} disks", field="disks")
    seen: set[str] = set()
    for disk in disks:
        if not isinstance(disk, dict):
            raise InvalidSpec("each disk must be an object {disk_id, size, chunks}", field="disks")
        disk_id = validate_disk_id(disk.get("disk_id"))
        if disk_id in seen:
            raise InvalidSpec(f"disk id {disk_id!r} appears twice", field="disk_id")
        seen.add(disk_id)
        size = _count(disk, "size")
        chunks = disk.get("chunks")
        want = -(-size // chunk_size)
        if not isinstance(chunks, list) or len(chunks) != want:
            raise InvalidSpec(
                f"disk {disk_id}: {size} bytes in chunks of {chunk_size} need {want} chunk entries", field="chunks"
            )
        for c in chunks:
            if c is not None:
                validate_chunk_id(c)
    return index


def chunk_ids(index: dict[str, Any]) -> set[str]:
    """Every chunk a generation needs: its disks' (not the all-zero ``null`` ones) and its config."""
    ids = {index["config"]}
    for disk in index["disks"]:
        ids.update(c for c in disk["chunks"] if c is not None)
    return ids


def summary(index: dict[str, Any]) -> dict[str, Any]:
    """The index as a list shows it: ``disks`` reduced to ``{disk_id, size}``."""
    out = {k: v for k, v in index.items() if k != "disks"}
    out["disks"] = [{"disk_id": d["disk_id"], "size": d["size"]} for d in index["disks"]]
    return out
