"""The CD drive and ISO images: boot orders, the command line, what counts as an ISO (kasou.model.media,
kasou.hypervisor.qemu.cmdline, kasou.image.iso)."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from kasou.errors import AlreadyExists, InvalidSpec
from kasou.hypervisor.base import LaunchDisk, LaunchSpec
from kasou.hypervisor.qemu.cmdline import RuntimeFiles, build_argv
from kasou.image import import_image, list_images, load_image
from kasou.image.iso import inspect_iso
from kasou.model.media import boot_order, parse_boot
from kasou.model.spec import VMCreate

FILES = RuntimeFiles(dir=Path("/run/k/inst"), serial_log=Path("/log/inst.log"))


def spec(**kw: object) -> LaunchSpec:
    base: dict[str, object] = dict(name="inst", uuid="00000000-0000-0000-0000-0000000000c1", vcpus=1,
                                   memory_mib=512, disks=[LaunchDisk(id="disk0", path="/d/inst/disk0.qcow2")])  # fmt: skip
    base.update(kw)
    return LaunchSpec(**base)  # type: ignore[arg-type]


def devices(argv: list[str]) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv) if a == "-device"]


def iso_bytes(blocks: int = 24, platforms: tuple[int, ...] | None = None) -> bytearray:
    """An ISO 9660 file: a primary volume descriptor, maybe an El Torito boot record and catalog, a terminator."""
    data = bytearray(blocks * 2048)
    at = 16 * 2048
    data[at : at + 7] = b"\x01CD001\x01"
    struct.pack_into("<I", data, at + 80, blocks)
    struct.pack_into("<H", data, at + 128, 2048)
    n = 17
    if platforms is not None:
        at = n * 2048
        data[at : at + 7] = b"\x00CD001\x01"
        data[at + 7 : at + 30] = b"EL TORITO SPECIFICATION"
        struct.pack_into("<I", data, at + 71, 20)
        cat = 20 * 2048
        data[cat] = 0x01
        data[cat + 1] = platforms[0]
        data[cat + 30 : cat + 32] = b"\x55\xaa"
        off = cat + 64
        for i, p in enumerate(platforms[1:]):
            data[off] = 0x91 if i == len(platforms) - 2 else 0x90
            data[off + 1] = p
            struct.pack_into("<H", data, off + 2, 1)
            off += 64
        n += 1
    data[n * 2048 : n * 2048 + 7] = b"\xffCD001\x01"
    return data


def test_boot_orders() -> None:
    assert parse_boot("cdrom,disk") == ["cdrom", "disk"] and parse_boot(None) is None
    assert parse_boot(["disk"]) == ["disk"]
    assert boot_order(None) == ["disk", "cdrom"] and boot_order(["cdrom"]) == ["cdrom", "disk"]
    for bad in ("", "floppy", "cdrom,cdrom", "cdrom,,disk", 3):
        with pytest.raises(InvalidSpec):
            parse_boot(bad)


def test_create_specs() -> None:
    VMCreate.parse({"name": "a", "cdrom": "di", "disk": "8G", "boot": "cdrom,disk"})
    VMCreate.parse({"name": "a", "image": "tiny", "cdrom": "virtio-win"})  # a driver disc beside a disk image
    with pytest.raises(InvalidSpec, match="blank disk"):
        VMCreate.parse({"name": "a", "cdrom": "di"})
    with pytest.raises(InvalidSpec, match="no CD drive"):
        VMCreate.parse({"name": "a", "image": "tiny", "boot": "cdrom"})
    with pytest.raises(InvalidSpec, match="--cdrom"):
        VMCreate.parse({"name": "a"})
    with pytest.raises(InvalidSpec, match="cdrom"):
        VMCreate.parse({"name": "a", "cdrom": "../etc", "disk": "1G"})


def test_command_line_of_the_drive() -> None:
    plain = build_argv(spec(), FILES, "tcg", None)
    assert not any("ide-cd" in d or "bootindex" in d for d in devices(plain))  # VMs without a drive: unchanged
    full = build_argv(spec(cdrom_drive=True, cdrom="di", boot=["cdrom", "disk"]), FILES, "tcg", None,
                      cdrom=Path("/img/di/image.iso"))  # fmt: skip
    assert "virtio-blk-pci,drive=disk0,id=disk0-dev,bootindex=1" in devices(full)
    assert "ide-cd,bus=ide.0,id=cd0-dev,bootindex=0,drive=cd0" in devices(full)
    assert "driver=file,filename=/img/di/image.iso,node-name=cd0-file,read-only=on" in full
    empty = build_argv(spec(cdrom_drive=True), FILES, "tcg", None)
    assert "ide-cd,bus=ide.0,id=cd0-dev,bootindex=1" in devices(empty)  # default: the disk first
    assert "virtio-blk-pci,drive=disk0,id=disk0-dev,bootindex=0" in devices(empty)
    with pytest.raises(ValueError, match="give its file"):
        build_argv(spec(cdrom_drive=True, cdrom="di"), FILES, "tcg", None)
    with pytest.raises(ValueError, match="cdrom_drive"):
        spec(cdrom="di")


def test_what_is_an_iso(tmp_path: Path) -> None:
    f = tmp_path / "x.iso"
    f.write_bytes(iso_bytes())
    assert inspect_iso(f) == ()  # a disc that boots nothing (drivers) is an ISO all the same
    f.write_bytes(iso_bytes(platforms=(0x00, 0xEF)))
    assert inspect_iso(f) == ("bios", "uefi")
    f.write_bytes(iso_bytes(platforms=(0xEF,)))
    assert inspect_iso(f) == ("uefi",)
    f.write_bytes(iso_bytes()[: 20 * 2048])
    with pytest.raises(InvalidSpec, match="truncated"):
        inspect_iso(f)
    f.write_bytes(b"\0" * 40000)
    with pytest.raises(InvalidSpec, match=r"not an ISO 9660 image \(no 'CD001' at byte 0x8001\)"):
        inspect_iso(f)
    with pytest.raises(InvalidSpec, match="no such file"):
        inspect_iso(tmp_path / "none.iso")


def test_import_an_iso(tmp_path: Path) -> None:
    images = tmp_path / "images"
    src = tmp_path / "di.iso"
    src.write_bytes(iso_bytes(platforms=(0x00,)))
    art = import_image(images, "di", src)
    assert (art.kind, art.firmware, art.disk.name, art.disk_size_bytes) == (
        "iso",
        ("bios",),
        "image.iso",
        len(src.read_bytes()),
    )
    assert art.disk.read_bytes() == src.read_bytes() and art.disk.stat().st_mode & 0o777 == 0o444
    assert load_image(images, "di") == art and [a.kind for a in list_images(images)] == ["iso"]
    with pytest.raises(AlreadyExists):
        import_image(images, "di", src)
    with pytest.raises(InvalidSpec, match="leave out --firmware"):
        import_image(images, "di2", src, firmware=["uefi"])
    bad = tmp_path / "bad.iso"
    bad.write_bytes(b"\0" * 65536)
    with pytest.raises(InvalidSpec, match="not an ISO"):
        import_image(images, "bad", bad, kind="iso")
    with pytest.raises(InvalidSpec, match="kind must be"):
        import_image(images, "bad", bad, kind="floppy")
    assert sorted(p.name for p in images.iterdir() if not p.name.startswith(".")) == ["di"]
