"""One file read out of a disk image's file system, read-only (kasou.hypervisor.guestfiles), with a real loop
device and mount: an ext4 image made by ``mkfs.ext4 -d`` from a directory."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from kasou.errors import InvalidSpec, NotFound, TooLarge
from kasou.hypervisor import guestfiles


@pytest.fixture
def image(tmp_path: Path) -> Path:
    tree = tmp_path / "tree"
    (tree / "var/lib/pgsql").mkdir(parents=True)
    (tree / "var/lib/pgsql/orders.csv").write_text("1,2,3\n")
    (tree / "etc").mkdir()
    (tree / "etc/evil").symlink_to("/etc/hostname")  # absolute: it would be the host's file
    img = tmp_path / "disk.raw"
    subprocess.run(["truncate", "-s", "32M", str(img)], check=True)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-d", str(tree), str(img)], check=True, timeout=60)
    return img


def loops_of(img: Path) -> str:
    return subprocess.run(["losetup", "-j", str(img)], capture_output=True, text=True, timeout=10).stdout


def test_a_file_is_read_and_nothing_stays_attached(image: Path) -> None:
    assert guestfiles.read_file(image, "/var/lib/pgsql/orders.csv") == b"1,2,3\n"
    assert loops_of(image) == ""
    with pytest.raises(NotFound, match="is not in its file systems"):
        guestfiles.read_file(image, "/var/lib/nothing")
    with pytest.raises(TooLarge):
        guestfiles.read_file(image, "/var/lib/pgsql/orders.csv", limit=3)
    assert loops_of(image) == ""


def test_paths_leaving_the_guest_are_refused(image: Path) -> None:
    with pytest.raises(InvalidSpec, match="outside the guest"):
        guestfiles.read_file(image, "/etc/evil")
    for bad in ("relative/path", "/var/../etc/passwd"):
        with pytest.raises(InvalidSpec, match="not an absolute path"):
            guestfiles.read_file(image, bad)
    assert loops_of(image) == ""


def test_a_file_on_the_second_partition_of_a_gpt_disk(tmp_path: Path) -> None:
    """A disk as installers make it (GPT: a small first partition, then the root file system): the table is
    read by sfdisk, not the kernel (this machine's kernel has no partition support at all), each partition
    attached on its own."""
    fs = tmp_path / "root.ext4"
    tree = tmp_path / "tree"
    (tree / "var/lib/kasou").mkdir(parents=True)
    (tree / "var/lib/kasou/seq.log").write_text("1\n2\n3\n")
    subprocess.run(["truncate", "-s", "16M", str(fs)], check=True)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-d", str(tree), str(fs)], check=True, timeout=60)
    img = tmp_path / "disk.raw"
    subprocess.run(["truncate", "-s", "24M", str(img)], check=True)
    layout = "label: gpt\nstart=2048, size=2048, type=21686148-6449-6E6F-744E-656564454649\nstart=4096, size=32768\n"
    subprocess.run(["sfdisk", "-q", str(img)], input=layout, text=True, check=True, timeout=30)
    subprocess.run(["dd", f"if={fs}", f"of={img}", "bs=512", "seek=4096", "conv=notrunc", "status=none"],
                   check=True, timeout=60)  # fmt: skip
    assert guestfiles.partitions(img) == [(2048 * 512, 2048 * 512), (4096 * 512, 32768 * 512)]
    assert guestfiles.read_file(img, "/var/lib/kasou/seq.log") == b"1\n2\n3\n"
    assert loops_of(img) == ""
    with pytest.raises(NotFound, match=r"is not in its file systems \(1 mounted\)"):
        guestfiles.read_file(img, "/etc/hostname")
    assert loops_of(img) == ""
