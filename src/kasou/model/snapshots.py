"""Snapshots of a VM as the user asks for them and as the store keeps them (no I/O).

A snapshot's name is a kasou name (:func:`kasou.model.names.validate_name`): it
becomes part of file names (``<disk>.<snapshot>.qcow2``, ``<snapshot>.vmstate``).
"""

from __future__ import annotations

import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from kasou.errors import InvalidSpec
from kasou.model.names import validate_name


def validate_snapshot_name(name: object) -> str:
    validate_name(name, "snapshot")
    assert isinstance(name, str)
    return name


class SnapshotCreate(BaseModel):
    """What ``kasou snapshot create`` and ``POST /v1/vms/{name}/snapshots`` take."""

    model_config = ConfigDict(extra="forbid")

    name: str
    memory: bool = False  # also the RAM and device state: revert resumes the guest at that instant
    description: str = Field("", max_length=500)

    @classmethod
    def parse(cls, data: Any) -> SnapshotCreate:
        try:
            spec = cls.model_validate(data)
        except ValidationError as e:
            err = e.errors()[0]
            field = ".".join(str(p) for p in err["loc"]) or "request"
            raise InvalidSpec(f"{field}: {err['msg']}", field=field) from None
        validate_snapshot_name(spec.name)
        return spec


class SnapshotDisk(BaseModel):
    """One disk of a snapshot: ``base`` holds its content (never written while the snapshot exists);
    ``overlay`` was made on it at the snapshot and holds what the guest wrote since."""

    id: str
    base: str
    overlay: str


class SnapshotRecord(BaseModel):
    """A snapshot as the store keeps it, in its VM's record (oldest first)."""

    name: str
    created_at: float = Field(default_factory=time.time)
    description: str = ""
    memory: bool = False
    memory_path: str | None = None
    memory_bytes: int = 0
    size_bytes: int = 0  # allocated bytes of its disk layers (the bases) plus the memory state
    vm_state: str = "stopped"  # the VM's state when it was taken
    # a running VM's: application (its guest agent froze the file systems), crash (no agent answered) or
    # memory (the running state itself was saved); None: a stopped VM's disks
    consistency: Literal["application", "crash", "memory"] | None = None
    disks: list[SnapshotDisk] = []
    # taking: recorded before the agent is asked (its layers' paths are known), so a control plane that dies
    # meanwhile finds out at its next start whether the VM runs on the new layers; deleting: a merge began
    state: Literal["taking", "ready", "deleting"] = "ready"
    error: str | None = None  # why the last delete failed (retry the delete)


def newer_than(snapshots: list[SnapshotRecord], name: str) -> list[SnapshotRecord]:
    names = [s.name for s in snapshots]
    return snapshots[names.index(name) + 1 :] if name in names else []
