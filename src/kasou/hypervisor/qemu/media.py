"""A VM's CD drive: find the ISO an image names, and change the disc of a running VM over QMP.

The drive is an ``ide-cd`` on q35's built-in AHCI controller (``ide.0``), made at start when the
VM has one (:func:`kasou.hypervisor.qemu.cmdline.cdrom_args`). QEMU 7.2's
``blockdev-change-medium`` opens the tray (also when the guest locked it), swaps the medium read-only
and closes it again; ``eject`` with ``force`` empties it. The guest sees a media change, as on a real
drive. A confined QEMU reads the ISO as the VM's own user: the file is made readable (never
writable) before QEMU opens it, as any read-only image.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from kasou.errors import ImageNotFound, InvalidSpec, NotFound
from kasou.hypervisor.qemu.cmdline import CDROM_DEVICE

Execute = Callable[[str, dict[str, Any] | None], Awaitable[Any]]


def iso_file(images_dir: Path, image: str | None, vm: str | None = None) -> Path | None:
    """The file of ISO image ``image`` on this host (None for None); NotFound or InvalidSpec in one line
    (naming VM ``vm``'s way out: empty its drive)."""
    if image is None:
        return None
    from kasou.image import load_image  # the image layer sits beside the driver

    try:
        art = load_image(images_dir, image)
    except ImageNotFound:
        eject = f", or empty the CD drive of VM {vm!r}: kasou vm media eject {vm}" if vm else ""
        raise NotFound(
            f"ISO image {image!r} is not in this host's image store (import it: kasou image import {image} "
            f"FILE.iso{eject})",
            image=image,
        ) from None
    if art.kind != "iso":
        raise InvalidSpec(f"image {image!r} is a disk image, not an ISO: a CD drive holds an ISO image", field="iso")
    return art.disk


async def insert(execute: Execute, iso: Path) -> None:
    """Put ``iso`` in the running VM's drive (replacing any disc), read-only."""
    await execute(
        "blockdev-change-medium",
        {"id": CDROM_DEVICE, "filename": str(iso), "format": "raw", "read-only-mode": "read-only"},
    )


async def eject(execute: Execute) -> None:
    """Empty the running VM's drive, whether or not the guest locked its tray."""
    await execute("eject", {"id": CDROM_DEVICE, "force": True})


async def inserted(execute: Execute) -> str | None:
    """The file in the running VM's drive, None if it is empty (``query-block``)."""
    for dev in await execute("query-block", None) or []:
        if dev.get("qdev") == CDROM_DEVICE:
            return (dev.get("inserted") or {}).get("file")
    return None
