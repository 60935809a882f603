"""A bootable GPT disk in a plain file: no loop device, no mount, no ``nbd`` module.

The disk is laid out the way Debian's installer lays out a disk that boots both ways::

    sector 0        protective MBR, with GRUB's boot.img in its first 440 bytes (BIOS)
    sectors 1-33    GPT header and partition entries (and a backup copy at the end)
    1 MiB   p1      BIOS boot partition: GRUB's core.img (BIOS)
    2 MiB   p2      EFI system partition, FAT32: shim and GRUB (UEFI, Secure Boot)
    128 MiB p3      the root file system, ext4, filled from a directory

Each step is a tool that writes into a regular file at an offset: ``sfdisk`` partitions it,
``mkfs.fat --offset`` and ``mtools`` (``mmd``, ``mcopy`` with ``file@@offset``) make and fill
the EFI partition, ``mke2fs -E offset= -d DIR`` makes and fills the root file system, and the
BIOS boot code is written here, as ``grub-bios-setup`` writes it (:func:`bios_boot_sector`,
:func:`embed_core`). So a build needs no privilege for the disk itself, and nothing is left
attached to the host if it fails.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from kasou.errors import ImageError
from kasou.image.tools import run

__all__ = [
    "BIOS_BOOT_TYPE",
    "ESP_TYPE",
    "LINUX_ROOT_X86_64_TYPE",
    "SECTOR",
    "Layout",
    "Partition",
    "bios_boot_sector",
    "embed_core",
    "fill_esp",
    "gpt_layout",
    "install_bios_grub",
    "make_root_fs",
    "partition_disk",
    "sfdisk_script",
]

SECTOR = 512
MIB = 1024 * 1024
BIOS_BOOT_TYPE = "21686148-6449-6E6F-744E-656564454649"
ESP_TYPE = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"
#: The Discoverable Partitions Specification's type for an x86-64 root partition.
LINUX_ROOT_X86_64_TYPE = "4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709"

# Where grub-bios-setup patches GRUB's boot.img and core.img (grub's include/grub/i386/pc/boot.h).
BOOT_BPB = slice(0x03, 0x5A)  # a BIOS parameter block: kept from the disk's own sector 0
BOOT_KERNEL_SECTOR = 0x5C  # le64: the sector core.img starts at
BOOT_DRIVE = 0x64  # 0xff: use the drive the BIOS booted from
BOOT_DRIVE_CHECK = 0x66  # a jump that trusts the BIOS's drive number only for floppies: nop'd for disks
BOOT_PART_TABLE = slice(0x1B8, 0x1FE)  # disk signature and partition table: kept from the disk
BLOCKLIST_SIZE = 12  # struct grub_boot_blocklist { le64 start; le16 len; le16 segment; }
#: Where diskboot.img loads the rest of core.img: GRUB_BOOT_I386_PC_KERNEL_SEG + one sector.
CORE_SEGMENT = 0x800 + (SECTOR >> 4)


@dataclass(frozen=True)
class Partition:
    """One partition, in 512-byte sectors."""

    name: str
    type_guid: str
    start: int
    size: int

    @property
    def offset(self) -> int:
        """Where it starts, in bytes."""
        return self.start * SECTOR

    @property
    def size_bytes(self) -> int:
        return self.size * SECTOR


@dataclass(frozen=True)
class Layout:
    """The disk: its size and its three partitions."""

    size_bytes: int
    bios: Partition
    esp: Partition
    root: Partition


def gpt_layout(size_bytes: int, *, esp_mib: int = 126) -> Layout:
    """The partitions of a disk of ``size_bytes``: BIOS boot (1 MiB), EFI (``esp_mib``), root (the rest).

    Every partition starts on a MiB boundary; the root partition ends on one too, before the
    backup GPT in the disk's last 33 sectors.
    """
    per_mib = MIB // SECTOR
    total = size_bytes // SECTOR
    bios = Partition("bios", BIOS_BOOT_TYPE, 1 * per_mib, 1 * per_mib)
    esp = Partition("esp", ESP_TYPE, 2 * per_mib, esp_mib * per_mib)
    root_start = esp.start + esp.size
    root_end = ((total - 34) // per_mib) * per_mib
    if size_bytes % MIB or root_end - root_start < 64 * per_mib:
        raise ImageError(f"a disk of {size_bytes} bytes is too small or not a whole number of MiB")
    root = Partition("root", LINUX_ROOT_X86_64_TYPE, root_start, root_end - root_start)
    return Layout(size_bytes, bios, esp, root)


def sfdisk_script(layout: Layout) -> str:
    """The ``sfdisk`` input that makes ``layout``'s GPT."""
    lines = ["label: gpt", "unit: sectors"]
    for p in (layout.bios, layout.esp, layout.root):
        lines.append(f'start={p.start}, size={p.size}, type={p.type_guid}, name="{p.name}"')
    return "\n".join(lines) + "\n"


def partition_disk(disk: Path, layout: Layout) -> None:
    """Make ``disk`` a sparse file of the layout's size and write its GPT (and protective MBR)."""
    with disk.open("wb") as fh:
        fh.truncate(layout.size_bytes)
    run(["sfdisk", "--quiet", "--no-reread", "--no-tell-kernel", str(disk)], stdin=sfdisk_script(layout), timeout=120)


def make_root_fs(disk: Path, part: Partition, tree: Path, *, uuid: str, label: str = "root") -> None:
    """An ext4 file system in ``part`` of ``disk``, holding a copy of the directory ``tree``.

    ``mke2fs -d`` copies owners, modes, hard links, special files and extended attributes
    (capabilities) as they are in ``tree``, so the build must run as root to read them all.
    """
    block = 4096
    if part.size_bytes % block:
        raise ImageError(f"partition {part.name} is not a whole number of {block}-byte blocks")
    run(
        [
            "mke2fs", "-q", "-F", "-t", "ext4", "-b", str(block), "-L", label, "-U", uuid,
            "-E", f"offset={part.offset},root_owner=0:0",
            "-d", str(tree), str(disk), str(part.size_bytes // block),
        ],
        timeout=1800,
    )  # fmt: skip


def fill_esp(disk: Path, part: Partition, files: Mapping[str, Path], *, volume_id: str, label: str = "EFI") -> None:
    """A FAT32 file system in ``part`` of ``disk`` holding ``files`` (``EFI/BOOT/BOOTX64.EFI`` -> source).

    ``volume_id`` is 8 hex digits: what ``/etc/fstab`` names it by (``UUID=XXXX-XXXX``).
    """
    run(
        [
            "mkfs.fat", "-F", "32", "-S", str(SECTOR), "-s", "1", "-n", label, "-i", volume_id, "-h", str(part.start),
            f"--offset={part.start}", str(disk), str(part.size_bytes // 1024),
        ],
        timeout=120,
    )  # fmt: skip
    image = f"{disk}@@{part.offset}"
    env = {"MTOOLS_SKIP_CHECK": "1"}  # the partition need not match an old floppy's geometry
    made: set[str] = set()
    for target in sorted(files):
        parts = target.split("/")
        for depth in range(1, len(parts)):
            d = "/".join(parts[:depth])
            if d not in made:
                run(["mmd", "-i", image, f"::/{d}"], env=env, timeout=60)
                made.add(d)
        run(["mcopy", "-i", image, str(files[target]), f"::/{target}"], env=env, timeout=60)


def bios_boot_sector(boot_img: bytes, sector0: bytes, core_sector: int) -> bytes:
    """GRUB's ``boot.img`` made into this disk's sector 0, as ``grub-bios-setup`` makes it.

    It keeps the disk's own BIOS parameter block, disk signature and (protective) partition
    table, points at the sector ``core.img`` starts at, and trusts the BIOS's boot drive number.
    """
    if len(boot_img) != SECTOR or len(sector0) != SECTOR:
        raise ImageError(f"boot.img and sector 0 must be {SECTOR} bytes")
    out = bytearray(boot_img)
    out[BOOT_BPB] = sector0[BOOT_BPB]
    out[BOOT_KERNEL_SECTOR : BOOT_KERNEL_SECTOR + 8] = struct.pack("<Q", core_sector)
    out[BOOT_DRIVE] = 0xFF
    out[BOOT_DRIVE_CHECK : BOOT_DRIVE_CHECK + 2] = b"\x90\x90"
    out[BOOT_PART_TABLE] = sector0[BOOT_PART_TABLE]
    out[0x1FE:0x200] = b"\x55\xaa"
    return bytes(out)


def embed_core(core_img: bytes, core_sector: int) -> bytes:
    """``core.img`` with the block list its first sector (diskboot.img) loads the rest by.

    The rest lies right after the first sector, in one run: one block list entry (start,
    sectors, load segment), then an empty one that ends the list. Padded to whole sectors.
    """
    sectors = -(-len(core_img) // SECTOR)
    if sectors < 2:
        raise ImageError("core.img is shorter than two sectors")
    out = bytearray(core_img.ljust(sectors * SECTOR, b"\0"))
    first = SECTOR - BLOCKLIST_SIZE
    out[first : first + BLOCKLIST_SIZE] = struct.pack("<QHH", core_sector + 1, sectors - 1, CORE_SEGMENT)
    out[first - BLOCKLIST_SIZE : first] = bytes(BLOCKLIST_SIZE)
    return bytes(out)


def install_bios_grub(disk: Path, layout: Layout, boot_img: bytes, core_img: bytes) -> None:
    """Write GRUB for BIOS: ``core.img`` into the BIOS boot partition, ``boot.img`` into sector 0."""
    core = embed_core(core_img, layout.bios.start)
    if len(core) > layout.bios.size_bytes:
        raise ImageError(f"GRUB's core.img ({len(core)} bytes) does not fit the BIOS boot partition")
    with disk.open("r+b") as fh:
        sector0 = fh.read(SECTOR)
        fh.seek(layout.bios.offset)
        fh.write(core)
        fh.seek(0)
        fh.write(bios_boot_sector(boot_img, sector0, layout.bios.start))
        fh.flush()
        os.fsync(fh.fileno())
