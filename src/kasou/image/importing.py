"""``kasou image import NAME FILE``: any qcow2 or raw disk file becomes an image.

The file is checked before anything is made (``qemu-img info``; for qcow2 also ``qemu-img
check``), copied as a thin, self-contained qcow2 (a backing chain is flattened) into a
temporary directory beside the images, and renamed into place with its manifest. Which
firmware it boots with is read from its partition table unless given: an EFI system partition
means UEFI, a BIOS boot partition or boot code in the MBR means BIOS. A refusal (a bad name,
a name in use, a file that is not a disk or is damaged) is one line, and leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import struct
import tempfile
import uuid
from collections.abc import Callable, Collection, Sequence
from pathlib import Path
from typing import Any

from kasou.errors import AlreadyExists, ImageError, InvalidSpec, KasouError
from kasou.image.manifest import (
    FIRMWARES,
    ImageArtifacts,
    image_lock,
    read_image,
    remove_leftovers,
    write_manifest,
)
from kasou.image.tools import Progress, run
from kasou.model.names import validate_name

__all__ = ["IMPORT_FORMATS", "detect_firmware", "import_disk", "parse_firmware", "refuse_clash"]

IMPORT_FORMATS = ("qcow2", "raw")
QCOW2_MAGIC = b"QFI\xfb"
#: Sectors read to find the partition table: MBR, GPT header, 128 entries of 128 bytes.
HEAD_SECTORS = 34
ESP_GUID = uuid.UUID("C12A7328-F81F-11D2-BA4B-00A0C93EC93B")
BIOS_BOOT_GUID = uuid.UUID("21686148-6449-6E6F-744E-656564454649")
#: A copy may take long (a disk of some hundred GiB on a slow store); it is bounded all the same.
CONVERT_TIMEOUT_S = 6 * 3600


def parse_firmware(text: str) -> tuple[str, ...]:
    """``"uefi,bios"`` -> ``("bios", "uefi")``, in :data:`FIRMWARES` order; an unknown name is an InvalidSpec."""
    names = {p.strip() for p in text.split(",") if p.strip()}
    if not names or names - set(FIRMWARES):
        raise InvalidSpec(
            f"firmware must be one or more of {', '.join(FIRMWARES)} (comma-separated), not {text!r}", field="firmware"
        )
    return tuple(f for f in FIRMWARES if f in names)


def detect_firmware(head: bytes) -> tuple[str, ...]:
    """The firmware a disk boots with, from its first sectors; ``()`` if its table says nothing.

    GPT: an EFI system partition -> ``uefi``; a BIOS boot partition, or boot code in the
    protective MBR -> ``bios``. MBR: an EFI partition (type 0xEF) -> ``uefi``; boot code or an
    active partition -> ``bios``.
    """
    if len(head) < 512 or head[510:512] != b"\x55\xaa":
        return ()
    found: list[str] = []
    boot_code = any(head[:440])
    types = [head[446 + 16 * i + 4] for i in range(4)]
    active = any(head[446 + 16 * i] == 0x80 for i in range(4))
    if 0xEE in types and head[512:520] == b"EFI PART":
        entries_lba, count, size = struct.unpack_from("<QII", head, 512 + 72)
        guids = set()
        for i in range(count):
            at = entries_lba * 512 + i * size
            if at + 16 > len(head):
                break
            guids.add(uuid.UUID(bytes_le=bytes(head[at : at + 16])))
        if ESP_GUID in guids:
            found.append("uefi")
        if BIOS_BOOT_GUID in guids or boot_code:
            found.append("bios")
    else:
        if 0xEF in types:
            found.append("uefi")
        if boot_code or active:
            found.append("bios")
    return tuple(f for f in FIRMWARES if f in found)


def _info(source: Path) -> dict[str, Any]:
    out = run(["qemu-img", "info", "--output=json", str(source)], timeout=60)
    try:
        data = json.loads(out)
    except ValueError as exc:
        raise ImageError(f"'qemu-img info' said something that is not JSON about {source}") from exc
    if not isinstance(data, dict):
        raise ImageError(f"'qemu-img info' said something unexpected about {source}")
    return data


def _check_qcow2(source: Path) -> None:
    """``qemu-img check``: exit 0 clean, 3 leaked clusters only (harmless); anything else is damage."""
    out = run(["qemu-img", "check", "--output=json", str(source)], timeout=600, ok=(0, 2, 3))
    with contextlib.suppress(ValueError):
        data = json.loads(out)
        bad = int(data.get("corruptions", 0)) + int(data.get("check-errors", 0))
        if bad:
            raise InvalidSpec(f"{source} is a damaged qcow2 disk ({bad} errors found by qemu-img check)", field="file")
        return
    raise InvalidSpec(f"{source} is a damaged qcow2 disk (qemu-img check could not read it)", field="file")


def refuse_clash(images_dir: Path, name: str, reserved: Collection[str]) -> None:
    if name in reserved:
        raise AlreadyExists(f"'{name}' is the name of an image kasou builds (kasou image build {name}); choose another")
    if (images_dir / name).exists() or (images_dir / name).is_symlink():
        raise AlreadyExists(f"an image named '{name}' already exists")


def _inspect(source: Path) -> dict[str, Any]:
    """The checks made before anything is written: a readable, undamaged qcow2 or raw disk."""
    if not source.exists():
        raise InvalidSpec(f"no such file: {source}", field="file")
    if not source.is_file():
        raise InvalidSpec(f"{source} is not a regular file", field="file")
    try:
        info = _info(source)
    except ImageError as exc:
        raise InvalidSpec(f"{source} is not a disk qemu-img can read: {exc.message}", field="file") from None
    fmt = str(info.get("format", ""))
    with source.open("rb") as fh:
        magic = fh.read(4)
    if magic == QCOW2_MAGIC and fmt != "qcow2":
        raise InvalidSpec(f"{source} is a damaged qcow2 disk (its header is not one qemu-img can read)", field="file")
    if fmt not in IMPORT_FORMATS:
        raise InvalidSpec(
            f"{source} is a {fmt or 'unknown'} disk; kasou image import takes {' or '.join(IMPORT_FORMATS)}",
            field="file",
        )
    size = source.stat().st_size if fmt == "raw" else int(info.get("virtual-size", 0))
    if size <= 0:
        raise InvalidSpec(f"{source} is an empty disk", field="file")
    if size % 512:  # qemu-img rounds a raw file up to whole sectors; a disk never needs it
        raise InvalidSpec(f"{source} is not a disk: a raw disk is whole 512-byte sectors, it has {size} bytes",
                          field="file")  # fmt: skip
    if fmt == "qcow2":
        _check_qcow2(source)
    return info


def _read_head(disk: Path, scratch: Path) -> bytes:
    head = scratch / "head.raw"
    try:
        dd = ["qemu-img", "dd", "-f", "qcow2", "-O", "raw", f"if={disk}", f"of={head}", "bs=512"]
        run([*dd, f"count={HEAD_SECTORS}"], timeout=60)
        return head.read_bytes()
    finally:
        head.unlink(missing_ok=True)


def import_disk(
    images_dir: Path,
    name: str,
    source: Path,
    *,
    reserved: Collection[str] = (),
    firmware: Sequence[str] | None = None,
    progress: Progress | None = None,
) -> ImageArtifacts:
    """Make the image ``name`` from the disk file ``source`` (qcow2 or raw).

    ``reserved`` are names of images kasou builds (refused, as is a name in use). ``firmware``
    (some of ``bios``, ``uefi``, ``uefi-secure``) overrides what the partition table says; a
    disk whose table says nothing is taken as BIOS. Raises :class:`InvalidSpec` for a bad name
    or file, :class:`AlreadyExists` for a name in use, :class:`ImageError` if the copy fails.
    """
    report = progress or (lambda _step, _fraction: None)
    validate_name(name, "image")
    if firmware is not None:
        firmware = parse_firmware(",".join(firmware))
    images_dir = Path(images_dir).absolute()
    source = Path(source).absolute()
    refuse_clash(images_dir, name, reserved)
    report(f"checking {source.name}", 0.02)
    info = _inspect(source)

    def fill(tmp: Path) -> dict[str, Any]:
        report(f"copying {source.name} ({info['format']})", 0.05)
        disk = tmp / "disk.qcow2"
        run(
            ["qemu-img", "convert", "-q", "-f", str(info["format"]), "-O", "qcow2", str(source), str(disk)],
            timeout=CONVERT_TIMEOUT_S,
        )
        report("reading its partition table", 0.9)
        found = tuple(firmware) if firmware else (detect_firmware(_read_head(disk, tmp)) or ("bios",))
        return {
            "kernel": None,
            "initrd": None,
            "disk": disk.name,
            "disk_format": "qcow2",
            "disk_size_bytes": int(info["virtual-size"]),
            "kernel_args": "",
            "firmware": list(found),
            "origin": "imported",
            "source": str(source),
            "source_format": str(info["format"]),
        }

    art = place_image(images_dir, name, source, reserved, "image", fill)
    report("done", 1.0)
    return art


def place_image(
    images_dir: Path, name: str, source: Path, reserved: Collection[str], what: str,
    fill: Callable[[Path], dict[str, Any]],
) -> ImageArtifacts:  # fmt: skip
    """Make image ``name`` under the images lock: ``fill`` writes its files into a fresh directory (readable by a
    confined QEMU) and returns its manifest; the directory becomes the image at once, or nothing is left."""
    try:
        images_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ImageError(f"cannot create {images_dir}: {exc.strerror}") from exc
    with image_lock(images_dir, name):
        refuse_clash(images_dir, name, reserved)
        remove_leftovers(images_dir, name)
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.import-", dir=images_dir))
        try:
            tmp.chmod(0o755)  # a confined QEMU reads it as the VM's own user
            write_manifest(tmp, name, fill(tmp))
            os.rename(tmp, images_dir / name)
        except KasouError:
            raise
        except OSError as exc:
            raise ImageError(f"importing {source} as {what} '{name}' failed: {exc}") from exc
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return read_image(images_dir, name, rebuild="")
