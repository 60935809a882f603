"""``kasou image import``: any qcow2 or raw disk becomes an image; a bad one is refused with nothing left behind."""

from __future__ import annotations

import json
import struct
import subprocess
from pathlib import Path

import pytest

from kasou.errors import AlreadyExists, ImageNotFound, InvalidSpec
from kasou.image import delete_image, disk, import_image, list_images, load_image
from kasou.image.importing import detect_firmware, parse_firmware
from tests.cli_errors import error_of

MIB = 1024 * 1024


def _qemu_img(*args: str) -> None:
    subprocess.run(["qemu-img", *args], check=True, capture_output=True, timeout=60)


def _gpt_disk(path: Path) -> Path:
    """A raw disk with the debian image's partition table (BIOS boot and EFI partitions)."""
    disk.partition_disk(path, disk.gpt_layout(160 * MIB, esp_mib=34))
    return path


def _contents(images: Path) -> list[str]:
    return sorted(p.name for p in images.iterdir()) if images.exists() else []


def test_a_raw_gpt_disk_is_imported_as_thin_qcow2(tmp_path: Path) -> None:
    images = tmp_path / "images"
    source = _gpt_disk(tmp_path / "emr.raw")
    steps: list[tuple[str, float]] = []
    art = import_image(images, "emr", source, progress=lambda s, f: steps.append((s, f)))
    assert steps[-1] == ("done", 1.0)
    assert (art.name, art.disk_format, art.disk_size_bytes) == ("emr", "qcow2", 160 * MIB)
    assert art.firmware == ("bios", "uefi")  # BIOS boot and EFI system partitions
    assert art.origin == "imported" and art.kernel is None and art.initrd is None
    assert art.built_at
    info = json.loads(subprocess.run(["qemu-img", "info", "--output=json", str(art.disk)],
                                     capture_output=True, text=True, check=True).stdout)  # fmt: skip
    assert info["format"] == "qcow2" and "backing-filename" not in info
    assert source.exists()  # the file itself is left as it was
    assert load_image(images, "emr") == art
    assert [a.name for a in list_images(images)] == ["emr"]
    manifest = json.loads((images / "emr" / "manifest.json").read_text())
    assert manifest["source"] == str(source) and manifest["source_format"] == "raw"
    assert _contents(images) == [".emr.lock", "emr"]


def test_a_qcow2_with_a_backing_file_is_flattened_and_firmware_can_be_given(tmp_path: Path) -> None:
    base = _gpt_disk(tmp_path / "base.raw")
    top = tmp_path / "top.qcow2"
    _qemu_img("create", "-q", "-f", "qcow2", "-F", "raw", "-b", str(base), str(top))
    art = import_image(tmp_path / "images", "pacs", top, firmware=["uefi-secure", "uefi"])
    assert art.firmware == ("uefi", "uefi-secure")
    info = json.loads(subprocess.run(["qemu-img", "info", "--output=json", str(art.disk)],
                                     capture_output=True, text=True, check=True).stdout)  # fmt: skip
    assert "backing-filename" not in info
    head = tmp_path / "head.raw"
    _qemu_img("dd", "-f", "qcow2", "-O", "raw", f"if={art.disk}", f"of={head}", "bs=512", "count=34")
    assert detect_firmware(head.read_bytes()) == ("bios", "uefi")  # the disk's own table, whatever was given


def test_a_blank_disk_is_taken_as_bios(tmp_path: Path) -> None:
    blank = tmp_path / "blank.qcow2"
    _qemu_img("create", "-q", "-f", "qcow2", str(blank), "64M")
    assert import_image(tmp_path / "images", "blank", blank).firmware == ("bios",)


def _corrupt_qcow2(path: Path) -> Path:
    _qemu_img("create", "-q", "-f", "qcow2", str(path), "64M")
    subprocess.run(["qemu-io", "-c", "write -P 0x55 0 1M", str(path)], check=True, capture_output=True, timeout=60)
    data = bytearray(path.read_bytes())
    (l1,) = struct.unpack_from(">Q", data, 40)
    struct.pack_into(">Q", data, l1, 0x8000000000000000 | (1 << 30))  # an L2 table past the end of the file
    path.write_bytes(bytes(data))
    return path


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda d: d / "missing.qcow2", "no such file"),
        (lambda d: d, "not a regular file"),
        (lambda d: _corrupt_qcow2(d / "broken.qcow2"), r"damaged qcow2 disk \(2 errors"),
        (
            lambda d: (d / "trunc.qcow2").write_bytes(b"QFI\xfb" + bytes(60)) and d / "trunc.qcow2",
            "damaged qcow2 disk .its header",
        ),
        (
            lambda d: (d / "short.qcow2").write_bytes(b"QFI\xfb\0\0\0\3" + bytes(56)) and d / "short.qcow2",
            "not a disk qemu-img can read",
        ),
        (lambda d: (d / "notes.txt").write_text("not a disk\n") and d / "notes.txt", "whole 512-byte sectors"),
        (lambda d: (d / "empty.raw").write_bytes(b"") or d / "empty.raw", "empty disk"),
    ],
)
def test_bad_files_are_refused_and_nothing_is_left(tmp_path: Path, make: object, message: str) -> None:
    images = tmp_path / "images"
    images.mkdir()
    source = make(tmp_path)  # type: ignore[operator]
    with pytest.raises(InvalidSpec, match=message) as err:
        import_image(images, "emr", source)
    assert "\n" not in err.value.message
    assert _contents(images) == []


def test_other_formats_are_refused(tmp_path: Path) -> None:
    vmdk = tmp_path / "appliance.vmdk"
    _qemu_img("create", "-q", "-f", "vmdk", str(vmdk), "64M")
    with pytest.raises(InvalidSpec, match="is a vmdk disk; kasou image import takes qcow2 or raw"):
        import_image(tmp_path / "images", "emr", vmdk)
    assert _contents(tmp_path / "images") == []


def test_names_in_use_built_in_or_bad_are_refused(tmp_path: Path) -> None:
    images = tmp_path / "images"
    source = _gpt_disk(tmp_path / "emr.raw")
    import_image(images, "emr", source)
    before = _contents(images)
    with pytest.raises(AlreadyExists, match="an image named 'emr' already exists"):
        import_image(images, "emr", source)
    for name in ("tiny", "debian"):
        with pytest.raises(AlreadyExists, match=f"'{name}' is the name of an image kasou builds"):
            import_image(images, name, source)
    with pytest.raises(InvalidSpec, match=r"image '\.\./x'"):
        import_image(images, "../x", source)
    with pytest.raises(InvalidSpec, match="firmware must be"):
        import_image(images, "lab", source, firmware=["efi"])
    assert _contents(images) == before


def test_delete_and_unknown_images(tmp_path: Path) -> None:
    images = tmp_path / "images"
    import_image(images, "emr", _gpt_disk(tmp_path / "emr.raw"))
    delete_image(images, "emr")
    assert list_images(images) == []
    with pytest.raises(ImageNotFound, match=r"unknown image 'emr' \(images here: none"):
        load_image(images, "emr")
    with pytest.raises(ImageNotFound, match="image 'debian' is not built; run: kasou image build debian"):
        load_image(images, "debian")


def test_parse_firmware() -> None:
    assert parse_firmware("bios, uefi,bios") == ("bios", "uefi")
    for bad in ("", "efi", "bios,csm"):
        with pytest.raises(InvalidSpec):
            parse_firmware(bad)


def test_detect_firmware_from_mbr_disks() -> None:
    head = bytearray(512)
    head[510:512] = b"\x55\xaa"
    assert detect_firmware(bytes(head)) == ()
    head[446] = 0x80  # an active partition
    assert detect_firmware(bytes(head)) == ("bios",)
    head[446] = 0
    head[446 + 4] = 0xEF  # an EFI system partition on MBR
    assert detect_firmware(bytes(head)) == ("uefi",)
    assert detect_firmware(b"") == ()


def test_the_cli_imports_lists_and_refuses(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from kasou.cli import main as cli

    monkeypatch.setenv("KASOU_IMAGES", str(tmp_path / "images"))
    runner = CliRunner()
    source = _gpt_disk(tmp_path / "emr.raw")
    r = runner.invoke(cli.app, ["image", "import", "emr", str(source)])
    assert r.exit_code == 0, r.output
    assert r.output.startswith("image emr: imported from") and "firmware bios, uefi" in r.output
    listed = json.loads(runner.invoke(cli.app, ["image", "list", "--json"]).output)
    assert [(i["name"], i["origin"], i["firmware"], i["disk_size_bytes"]) for i in listed] == [
        ("emr", "imported", ["bios", "uefi"], 160 * MIB)
    ]
    assert 0 < listed[0]["file_bytes"] < 160 * MIB  # thin
    table = runner.invoke(cli.app, ["image", "list"]).output
    assert "emr" in table and "qcow2" in table and "imported" in table
    again = runner.invoke(cli.app, ["image", "import", "emr", str(source)])
    assert again.exit_code == 4 and "exists" in error_of(again)
    assert runner.invoke(cli.app, ["image", "delete", "emr"]).output == "image emr: deleted\n"
