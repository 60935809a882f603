"""The GPT disk of the debian image, made in a plain file (kasou.image.disk): layout, boot code, real tools."""

from __future__ import annotations

import json
import struct
import subprocess
from pathlib import Path

import pytest

from kasou.errors import ImageError
from kasou.image import disk
from kasou.image.importing import detect_firmware

MIB = 1024 * 1024


def test_layout_of_a_4_gib_disk() -> None:
    layout = disk.gpt_layout(4096 * MIB)
    assert (layout.bios.start, layout.bios.size) == (2048, 2048)  # 1 MiB at 1 MiB
    assert (layout.esp.start, layout.esp.size) == (4096, 126 * 2048)
    assert layout.root.start == 128 * 2048
    end = layout.root.start + layout.root.size
    assert end % 2048 == 0 and end <= 4096 * 2048 - 34  # the backup GPT keeps its 33 sectors
    assert layout.root.size_bytes % 4096 == 0
    assert layout.esp.offset == 2 * MIB
    assert layout.bios.type_guid == disk.BIOS_BOOT_TYPE and layout.esp.type_guid == disk.ESP_TYPE


def test_a_disk_too_small_or_not_whole_mib_is_refused() -> None:
    with pytest.raises(ImageError, match="too small"):
        disk.gpt_layout(150 * MIB)
    with pytest.raises(ImageError, match="whole number of MiB"):
        disk.gpt_layout(4096 * MIB + 512)


def test_sfdisk_script_names_every_partition() -> None:
    script = disk.sfdisk_script(disk.gpt_layout(4096 * MIB))
    lines = script.splitlines()
    assert lines[:2] == ["label: gpt", "unit: sectors"]
    assert lines[2] == f'start=2048, size=2048, type={disk.BIOS_BOOT_TYPE}, name="bios"'
    assert 'name="esp"' in lines[3] and 'name="root"' in lines[4]


def test_boot_sector_is_patched_as_grub_bios_setup_does() -> None:
    boot_img = bytes(range(256)) * 2
    sector0 = bytearray(512)
    sector0[0x03:0x5A] = b"B" * (0x5A - 0x03)  # a BIOS parameter block
    sector0[0x1B8:0x1FE] = b"P" * (0x1FE - 0x1B8)  # disk signature and partition table
    out = disk.bios_boot_sector(boot_img, bytes(sector0), 2048)
    assert len(out) == 512
    assert out[:3] == boot_img[:3]  # GRUB's jump
    assert out[0x03:0x5A] == sector0[0x03:0x5A]
    assert struct.unpack_from("<Q", out, 0x5C)[0] == 2048
    assert out[0x64] == 0xFF
    assert out[0x66:0x68] == b"\x90\x90"
    assert out[0x68:0x1B8] == boot_img[0x68:0x1B8]  # the rest of GRUB's code
    assert out[0x1B8:0x1FE] == sector0[0x1B8:0x1FE]
    assert out[0x1FE:] == b"\x55\xaa"
    with pytest.raises(ImageError):
        disk.bios_boot_sector(boot_img[:100], bytes(sector0), 2048)


def test_core_img_gets_a_block_list_for_its_other_sectors() -> None:
    core = b"\xaa" * 1300  # 3 sectors, the last one short
    out = disk.embed_core(core, 2048)
    assert len(out) == 3 * 512
    assert out[1300:] == bytes(3 * 512 - 1300)
    start, length, segment = struct.unpack_from("<QHH", out, 512 - 12)
    assert (start, length, segment) == (2049, 2, 0x820)
    assert out[512 - 24 : 512 - 12] == bytes(12)  # the list's end
    assert out[:488] == core[:488] and out[512:1300] == core[512:1300]
    with pytest.raises(ImageError):
        disk.embed_core(b"x" * 512, 2048)


def test_a_real_disk_with_all_three_partitions(tmp_path: Path) -> None:
    """sfdisk, mkfs.fat/mtools and mke2fs -d write at their offsets in one file; nothing is mounted.
    (fdisk, dosfstools and mtools are installed by scripts/install.sh.)"""
    layout = disk.gpt_layout(160 * MIB, esp_mib=34)
    raw = tmp_path / "disk.raw"
    disk.partition_disk(raw, layout)
    table = json.loads(subprocess.run(["sfdisk", "-J", str(raw)], capture_output=True, text=True, check=True).stdout)
    parts = table["partitiontable"]["partitions"]
    assert [(p["start"], p["size"], p["name"]) for p in parts] == [
        (2048, 2048, "bios"), (4096, 34 * 2048, "esp"), (layout.root.start, layout.root.size, "root"),
    ]  # fmt: skip

    efi = tmp_path / "BOOTX64.EFI"
    efi.write_bytes(b"MZ-not-really")
    disk.fill_esp(raw, layout.esp, {"EFI/BOOT/BOOTX64.EFI": efi, "EFI/debian/grub.cfg": efi}, volume_id="1234ABCD")
    env = {"MTOOLS_SKIP_CHECK": "1", "PATH": "/usr/bin:/bin"}
    listing = subprocess.run(["mdir", "-i", f"{raw}@@{layout.esp.offset}", "::/EFI/BOOT"],
                             capture_output=True, text=True, env=env, check=True).stdout  # fmt: skip
    assert "BOOTX64" in listing and "1234-ABCD" in listing

    tree = tmp_path / "tree"
    (tree / "etc").mkdir(parents=True)
    (tree / "etc/hostname").write_text("kasou-debian\n")
    disk.make_root_fs(raw, layout.root, tree, uuid="08bb3e84-de85-4468-ae50-cd04acb6e7c9")
    part = tmp_path / "root.img"
    with raw.open("rb") as src, part.open("wb") as dst:
        src.seek(layout.root.offset)
        dst.write(src.read(layout.root.size_bytes))
    cat = subprocess.run(["debugfs", "-R", "cat /etc/hostname", str(part)], capture_output=True, text=True, check=True)
    assert cat.stdout == "kasou-debian\n"

    boot_img = b"\xeb\x63" + bytes(510)
    disk.install_bios_grub(raw, layout, boot_img, b"\xcc" * 1500)
    head = raw.read_bytes()[: 34 * 512]
    assert head[:2] == b"\xeb\x63" and head[510:512] == b"\x55\xaa"
    assert head[0x1BE + 4] == 0xEE  # the protective MBR's partition survived
    assert detect_firmware(head) == ("bios", "uefi")
    with pytest.raises(ImageError, match="does not fit"):
        disk.install_bios_grub(raw, layout, boot_img, b"\xcc" * (MIB + 1))
