"""What a user asks for: VM specs, names and sizes, validated before anything happens.

Validation is strict and total: anything that is not clearly right is refused
with an :class:`~kasou.errors.InvalidSpec` naming the field, before kasou
touches a disk or a process.
"""

from __future__ import annotations

import re
import secrets
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, ValidationError, field_validator

from kasou.errors import InvalidSpec
from kasou.model.units import parse_size

NAME_MAX = 63
# A name becomes part of file names, QEMU's -name and (later) tap devices and
# DNS labels: so letters, digits, '-', '_' and '.', starting with a letter or digit.
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")

MIN_MEMORY_MIB = 32
MAX_MEMORY_MIB = 4 * 1024 * 1024  # 4 TiB: a sanity bound; the host check is separate
MAX_VCPUS = 255


def validate_name(name: object, what: str = "name") -> str:
    """Return ``name`` if it is a safe kasou name, else raise InvalidSpec."""
    if not isinstance(name, str):
        raise InvalidSpec(f"{what} must be a string", field=what)
    if not name:
        raise InvalidSpec(f"{what} must not be empty", field=what)
    if len(name) > NAME_MAX:
        raise InvalidSpec(f"{what} is {len(name)} characters long; at most {NAME_MAX} are allowed", field=what)
    if ".." in name:
        raise InvalidSpec(f"{what} {name!r} must not contain '..'", field=what)
    if not _NAME_RE.match(name):
        raise InvalidSpec(
            f"{what} {name!r} may contain only letters, digits, '-', '_' and '.', "
            "and must start with a letter or digit",
            field=what,
        )
    return name


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
    shared: bool = False  # on storage every host sees (migration moves no disk data)


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
    storage: Literal["local", "shared"] = "local"  # shared: the disk lives where every host sees it

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
