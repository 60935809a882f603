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
