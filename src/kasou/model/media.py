"""A VM's CD drive and boot order: installing an operating system from an ISO image.

An ISO is an image of kind ``iso`` in the image store of a host (``kasou image import NAME FILE.iso``);
a VM names it, never a path. A VM created with ``--cdrom ISO`` has one CD drive (an ``ide-cd`` on
q35's built-in AHCI controller) for good: ``kasou vm media eject`` empties it and ``kasou vm media
insert`` fills it again, on a running VM or a stopped one. The medium in the drive is part of the
VM's record, so it is there again after a restart of the VM or of the agent, and a live migration
needs the same ISO image on the destination host. ``--boot cdrom,disk`` is the order the firmware
tries the devices in (default: the disk, then the CD, so a blank disk falls through to the
installer and an installed disk boots by itself).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from kasou.errors import InvalidSpec
from kasou.model.names import validate_name
from kasou.model.parsing import parse_model

BootDevice = Literal["cdrom", "disk"]
BOOT_DEVICES: tuple[str, ...] = ("cdrom", "disk")
#: The order the firmware tries a VM's devices in when none was given.
DEFAULT_BOOT: tuple[str, ...] = ("disk", "cdrom")
#: The image kinds: a disk a VM's disk is copied from, or an ISO 9660 file a CD drive holds.
IMAGE_KINDS = ("disk", "iso")


def parse_boot(value: object) -> list[str] | None:
    """``"cdrom,disk"`` or ``["cdrom", "disk"]`` -> ``["cdrom", "disk"]``; None stays None.

    Each device at most once, only the ones kasou knows; anything else is an InvalidSpec."""
    if value is None:
        return None
    if isinstance(value, str):
        items = [p.strip() for p in value.split(",")]
    elif isinstance(value, list) and all(isinstance(v, str) for v in value):
        items = [v.strip() for v in value]
    else:
        raise InvalidSpec("boot must be a comma-separated list of cdrom and disk, e.g. cdrom,disk", field="boot")
    if not items or any(i not in BOOT_DEVICES for i in items):
        raise InvalidSpec(
            f"boot must name devices among {', '.join(BOOT_DEVICES)} (comma-separated), not {value!r}", field="boot"
        )
    if len(set(items)) != len(items):
        raise InvalidSpec(f"boot names a device twice: {value!r}", field="boot")
    return items


def check_boot(boot: list[str] | None, has_drive: bool) -> None:
    """A boot order that names the CD needs a VM with a CD drive."""
    if boot is not None and "cdrom" in boot and not has_drive:
        raise InvalidSpec("boot names cdrom but the VM has no CD drive: give it one with --cdrom ISO", field="boot")


def boot_order(boot: Sequence[str] | None) -> list[str]:
    """Every device in the order the firmware tries them (those not named come after, in the default order)."""
    named = list(boot or [])
    return named + [d for d in DEFAULT_BOOT if d not in named]


class MediaInsert(BaseModel):
    """Body of ``POST /v1/vms/{name}/media``: the ISO image to put in the VM's CD drive."""

    model_config = ConfigDict(extra="forbid")

    iso: str

    @classmethod
    def parse(cls, data: Any) -> MediaInsert:
        req: MediaInsert = parse_model(cls, data)
        validate_name(req.iso, "iso")
        return req
