"""What a user asks for when a VM's devices change: a disk added or grown, a NIC added (``kasou disk add``,
``kasou disk resize``, ``kasou nic add`` and their API bodies). Validated before anything happens."""

from __future__ import annotations

import re
from typing import Any

from pydantic import BaseModel, ConfigDict

from kasou.errors import InvalidSpec
from kasou.model.names import validate_name
from kasou.model.parsing import parse_model
from kasou.model.units import parse_size

MAX_DISKS = 16  # disks of one VM (its boot disk included)
MAX_NICS = 8
HOTPLUG_PORTS = 8  # empty PCIe root ports a VM gets at its start, for disks and NICs plugged in while it runs

_DISK_ID = re.compile(r"^disk([0-9]{1,2})$")
_NIC_ID = re.compile(r"^net([0-9]{1,2})$")


class DiskAdd(BaseModel):
    """``POST /v1/vms/{name}/disks``: a new empty disk."""

    model_config = ConfigDict(extra="forbid")

    size: str | int
    pool: str | None = None  # default: the pool of the VM's boot disk

    @classmethod
    def parse(cls, data: Any) -> DiskAdd:
        spec: DiskAdd = parse_model(cls, data)
        parse_size(spec.size, "size")
        if spec.pool is not None:
            validate_name(spec.pool, "pool")
        return spec

    @property
    def size_bytes(self) -> int:
        return parse_size(self.size, "size")


class DiskResize(BaseModel):
    """``POST /v1/vms/{name}/disks/{disk}/resize``: the disk's new (larger) size."""

    model_config = ConfigDict(extra="forbid")

    size: str | int

    @classmethod
    def parse(cls, data: Any) -> DiskResize:
        spec: DiskResize = parse_model(cls, data)
        parse_size(spec.size, "size")
        return spec

    @property
    def size_bytes(self) -> int:
        return parse_size(self.size, "size")


class NicAdd(BaseModel):
    """``POST /v1/vms/{name}/nics``: a new NIC on a network (``user`` or one made with kasou network create)."""

    model_config = ConfigDict(extra="forbid")

    network: str

    @classmethod
    def parse(cls, data: Any) -> NicAdd:
        spec: NicAdd = parse_model(cls, data)
        validate_name(spec.network, "network")
        return spec


def check_disk_id(disk_id: str) -> str:
    if not _DISK_ID.fullmatch(disk_id):
        raise InvalidSpec(f"{disk_id!r} is not a disk of a VM (disk0, disk1, ...)", field="disk")
    return disk_id


def check_nic_id(nic_id: str) -> str:
    if not _NIC_ID.fullmatch(nic_id):
        raise InvalidSpec(f"{nic_id!r} is not a NIC of a VM (net0, net1, ...)", field="nic")
    return nic_id


def next_id(prefix: str, taken: list[str]) -> str:
    """The first ``<prefix>N`` after the highest one taken (ids are never reused while the VM lives on)."""
    nums = [int(t[len(prefix) :]) for t in taken if t.startswith(prefix) and t[len(prefix) :].isdigit()]
    return f"{prefix}{max(nums, default=-1) + 1}"


def free_port(used: set[int | None], ports: int) -> int | None:
    """The lowest hot-plug port of ``1..ports`` not in ``used``; None if all are taken."""
    return next((p for p in range(1, ports + 1) if p not in used), None)
