"""What a user asks for: VM specs, names and sizes, validated before anything happens.

Validation is strict and total: anything that is not clearly right is refused
with an :class:`~kasou.errors.InvalidSpec` naming the field, before kasou
touches a disk or a process.
"""

from __future__ import annotations

import re
import secrets
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, StrictInt, ValidationError, field_validator

from kasou.errors import InvalidSpec

NAME_MAX = 63
# A name becomes part of file names, QEMU's -name and (later) tap devices and
# DNS labels: so letters, digits, '-', '_' and '.', starting with a letter or digit.
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")

MIB = 1024 * 1024
MIN_MEMORY_MIB = 32
MAX_MEMORY_MIB = 4 * 1024 * 1024  # 4 TiB: a sanity bound; the host check is separate
MAX_VCPUS = 255
MIN_DISK_BYTES = MIB
MAX_DISK_BYTES = 64 * 1024**4  # 64 TiB

_UNITS = {
    "": 1,
    "b": 1,
    "k": 1024,
    "kb": 1024,
    "kib": 1024,
    "m": MIB,
    "mb": MIB,
    "mib": MIB,
    "g": 1024**3,
    "gb": 1024**3,
    "gib": 1024**3,
    "t": 1024**4,
    "tb": 1024**4,
    "tib": 1024**4,
}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*$")


def validate_name(name: object, what: str = "name") -> str:
    """Return ``name`` if it is a safe kasou name, else raise InvalidSpec."""
    if not isinstance(name, str):
        raise InvalidSpec(f"{what} must be a string", field=what)
    if not name:
        raise InvalidSpec(f"{what} must not be empty", field=what)
    if len(name) > NAME_MAX:
        raise InvalidSpec(
            f"{what} is {len(name)} characters long; at most {NAME_MAX} are allowed", field=what
        )
    if ".." in name:
        raise InvalidSpec(f"{what} {name!r} must not contain '..'", field=what)
    if not _NAME_RE.match(name):
        raise InvalidSpec(
            f"{what} {name!r} may contain only letters, digits, '-', '_' and '.', "
            "and must start with a letter or digit",
            field=what,
        )
    return name


def parse_size(value: object, what: str = "size") -> int:
    """Parse a size such as ``512M``, ``10G``, ``1.5GiB`` or ``1048576`` into bytes.

    Units are binary (K = 1024). A bare number is bytes, as in ``qemu-img``.
    """
    if isinstance(value, bool):
        raise InvalidSpec(f"{what} must be a size such as 512M or 10G", field=what)
    if isinstance(value, int):
        n = value
    else:
        if not isinstance(value, str):
            raise InvalidSpec(f"{what} must be a size such as 512M or 10G", field=what)
        m = _SIZE_RE.match(value)
        unit = m.group(2).lower() if m else ""
        if not m or unit not in _UNITS:
            raise InvalidSpec(f"{what} {value!r} is not a size; use e.g. 512M, 10G or 1T", field=what)
        number = float(m.group(1)) if "." in m.group(1) else int(m.group(1))
        n = int(number * _UNITS[unit])
    if n < MIN_DISK_BYTES:
        raise InvalidSpec(f"{what} {format_size(n)} is below the minimum of 1 MiB", field=what)
    if n > MAX_DISK_BYTES:
        raise InvalidSpec(f"{what} {format_size(n)} is above the maximum of 64 TiB", field=what)
    # qcow2 images are sized in whole 512-byte sectors; round up, never down.
    return (n + 511) // 512 * 512


def format_size(n: int) -> str:
    """Bytes as a short human size (``10 GiB``, ``512 MiB``, ``300 B``)."""
    for unit, factor in (("TiB", 1024**4), ("GiB", 1024**3), ("MiB", MIB), ("KiB", 1024)):
        if abs(n) >= factor:
            v = n / factor
            return f"{v:.0f} {unit}" if v == int(v) else f"{v:.1f} {unit}"
    return f"{n} B"


def random_mac() -> str:
    """A locally administered unicast MAC in QEMU's customary 52:54:00 range."""
    tail = secrets.token_bytes(3)
    return "52:54:00:" + ":".join(f"{b:02x}" for b in tail)


_MAC_RE = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")


class DiskSpec(BaseModel):
    """One virtual disk of a VM as recorded in the store."""

    model_config = ConfigDict(extra="forbid")

    id: str  # disk0, disk1, ...
    size_bytes: int
    format: str = "qcow2"
    path: str | None = None  # on the VM's host; set once the disk exists
    backing: str | None = None  # backing file (image or template disk), if any
    linked: bool = False  # an overlay on a template: the template must outlive it


class NicSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str  # net0, ...
    mac: str
    network: str = "user"

    @field_validator("mac")
    @classmethod
    def _mac(cls, v: str) -> str:
        v = v.lower()
        if not _MAC_RE.match(v) or int(v[:2], 16) & 1:
            raise ValueError(f"{v!r} is not a unicast MAC address")
        return v


class VMCreate(BaseModel):
    """The request to define a VM: what ``kasou vm create`` and ``POST /v1/vms`` take."""

    model_config = ConfigDict(extra="forbid")

    name: str
    vcpus: StrictInt = Field(1)
    memory_mib: StrictInt = Field(128)
    image: str | None = None
    template: str | None = None  # --from: a linked clone of this template
    disk: str | int | None = None  # size of the data disk, e.g. "1G"
    start: bool = False
    description: str = Field("", max_length=500)

    @classmethod
    def parse(cls, data: Any) -> VMCreate:
        """Validate raw input into a spec, raising InvalidSpec with one line."""
        try:
            spec = cls.model_validate(data)
        except ValidationError as e:
            err = e.errors()[0]
            field = ".".join(str(p) for p in err["loc"]) or "request"
            raise InvalidSpec(f"{field}: {err['msg']}", field=field) from None
        spec.check()
        return spec

    def check(self) -> None:
        """The rules that are about the spec alone (the host's limits are checked later)."""
        validate_name(self.name)
        if not 1 <= self.vcpus <= MAX_VCPUS:
            raise InvalidSpec(f"vcpus must be between 1 and {MAX_VCPUS}, not {self.vcpus}", field="vcpus")
        if not MIN_MEMORY_MIB <= self.memory_mib <= MAX_MEMORY_MIB:
            raise InvalidSpec(
                f"memory_mib must be between {MIN_MEMORY_MIB} and {MAX_MEMORY_MIB}, not {self.memory_mib}",
                field="memory_mib",
            )
        if self.image is None and self.template is None:
            raise InvalidSpec("give an image (--image) or a template (--from)", field="image")
        if self.image is not None and self.template is not None:
            raise InvalidSpec("give either an image or a template, not both", field="image")
        if self.image is not None:
            validate_name(self.image, "image")
        if self.template is not None:
            validate_name(self.template, "template")
        if self.disk is not None:
            parse_size(self.disk, "disk")

    @property
    def disk_bytes(self) -> int | None:
        return None if self.disk is None else parse_size(self.disk, "disk")
