"""ISO images: ``kasou image import NAME FILE.iso`` registers an installer (or driver) disc as an image of kind ``iso``.

The file is checked before anything is written: an ISO 9660 file system (its primary volume
descriptor, ``CD001`` at byte 0x8001), not shorter than its volume says, and its El Torito boot
catalog read for the firmware it boots with (BIOS, UEFI, both, or none: a disc of drivers, such
as virtio-win, is a valid ISO that boots nothing). It is copied as it is (read-only for every VM,
never written) into a temporary directory beside the images and renamed into place with its
manifest, so a refusal or a failure leaves nothing behind.
"""

from __future__ import annotations

import shutil
import struct
from collections.abc import Collection
from pathlib import Path
from typing import Any

from kasou.errors import InvalidSpec
from kasou.image.importing import place_image, refuse_clash
from kasou.image.manifest import ImageArtifacts
from kasou.image.tools import Progress
from kasou.model.names import validate_name

__all__ = ["ISO_FILE", "SECTOR", "import_iso", "inspect_iso", "is_iso"]

SECTOR = 2048
ISO_FILE = "image.iso"
#: The volume descriptors start at sector 16; a disc has a few (primary, boot record, Joliet, terminator).
FIRST_DESCRIPTOR = 16
MAX_DESCRIPTORS = 32
EL_TORITO = b"EL TORITO SPECIFICATION"
PLATFORM_X86, PLATFORM_EFI = 0x00, 0xEF


def is_iso(path: Path) -> bool:
    """Whether ``path`` holds an ISO 9660 file system (``CD001`` at byte 0x8001)."""
    try:
        with Path(path).open("rb") as fh:
            fh.seek(FIRST_DESCRIPTOR * SECTOR)
            head = fh.read(6)
    except OSError:
        return False
    return head[1:6] == b"CD001"


def _boot_platforms(fh: object, catalog_lba: int) -> set[int]:
    assert hasattr(fh, "seek") and hasattr(fh, "read")
    fh.seek(catalog_lba * SECTOR)
    cat: bytes = fh.read(SECTOR)
    if len(cat) < 64 or cat[0] != 0x01 or cat[30:32] != b"\x55\xaa":
        return set()
    platforms = {cat[1]}  # the validation entry's platform is the default entry's
    at = 64
    while at + 32 <= len(cat):
        header = cat[at]
        if header not in (0x90, 0x91):
            break
        platforms.add(cat[at + 1])
        (count,) = struct.unpack_from("<H", cat, at + 2)
        at += 32 + 32 * count
        if header == 0x91:  # the last section
            break
    return platforms


def inspect_iso(path: Path) -> tuple[str, ...]:
    """Check that ``path`` is a whole ISO 9660 file; the firmware its El Torito catalog boots (maybe none).

    Raises InvalidSpec (one line, naming the file) for anything else."""
    path = Path(path)
    if not path.exists():
        raise InvalidSpec(f"no such file: {path}", field="file")
    if not path.is_file():
        raise InvalidSpec(f"{path} is not a regular file", field="file")
    size = path.stat().st_size
    if not is_iso(path):
        raise InvalidSpec(f"{path} is not an ISO 9660 image (no 'CD001' at byte 0x8001)", field="file")
    platforms: set[int] = set()
    primary = False
    try:
        with path.open("rb") as fh:
            for i in range(MAX_DESCRIPTORS):
                fh.seek((FIRST_DESCRIPTOR + i) * SECTOR)
                desc = fh.read(SECTOR)
                if len(desc) < SECTOR or desc[1:6] != b"CD001":
                    raise InvalidSpec(f"{path} is a damaged ISO 9660 image (volume descriptor {i} is missing)",
                                      field="file")  # fmt: skip
                kind = desc[0]
                if kind == 255:  # the set terminator
                    break
                if kind == 1:
                    primary = True
                    (blocks,) = struct.unpack_from("<I", desc, 80)
                    (block_size,) = struct.unpack_from("<H", desc, 128)
                    if block_size not in (512, 1024, 2048) or blocks * block_size > size:
                        raise InvalidSpec(
                            f"{path} is a truncated ISO 9660 image: its volume has {blocks * block_size} bytes, "
                            f"the file {size}",
                            field="file",
                        )
                elif kind == 0 and desc[7 : 7 + len(EL_TORITO)] == EL_TORITO:
                    (catalog,) = struct.unpack_from("<I", desc, 71)
                    platforms |= _boot_platforms(fh, catalog)
    except OSError as exc:
        raise InvalidSpec(f"{path} cannot be read: {exc.strerror}", field="file") from None
    if not primary:
        raise InvalidSpec(f"{path} is a damaged ISO 9660 image (it has no primary volume descriptor)", field="file")
    found = []
    if PLATFORM_X86 in platforms:
        found.append("bios")
    if PLATFORM_EFI in platforms:
        found.append("uefi")
    return tuple(found)


def import_iso(
    images_dir: Path,
    name: str,
    source: Path,
    *,
    reserved: Collection[str] = (),
    progress: Progress | None = None,
) -> ImageArtifacts:
    """Make the ISO image ``name`` from ``source`` (see the module's text); InvalidSpec, AlreadyExists or
    ImageError in one line, nothing left behind."""
    report = progress or (lambda _step, _fraction: None)
    validate_name(name, "image")
    images_dir = Path(images_dir).absolute()
    source = Path(source).absolute()
    refuse_clash(images_dir, name, reserved)
    report(f"checking {source.name}", 0.02)
    firmware = inspect_iso(source)

    def fill(tmp: Path) -> dict[str, Any]:
        report(f"copying {source.name}", 0.05)
        iso = tmp / ISO_FILE
        shutil.copyfile(source, iso)
        iso.chmod(0o444)  # read-only for everyone: a CD is never written
        return {
            "kind": "iso",
            "kernel": None,
            "initrd": None,
            "disk": ISO_FILE,
            "disk_format": "raw",
            "disk_size_bytes": iso.stat().st_size,
            "kernel_args": "",
            "firmware": list(firmware),
            "origin": "imported",
            "source": str(source),
            "source_format": "iso",
        }

    art = place_image(images_dir, name, source, reserved, "ISO image", fill)
    report("done", 1.0)
    return art
