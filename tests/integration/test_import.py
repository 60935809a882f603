"""Importing real disks and booting them, through the kasou CLI on real QEMU.

The guest is the tiny image's, made into an appliance of two disks as an old system would be: disk0 is
a hybrid ISO that ``grub-mkrescue`` makes bootable from a hard disk (GRUB, the tiny kernel and its
initramfs, whose set-up script mounts its data from the second disk), disk1 the tiny image's ext4 data
disk. Both go through vmdk made by ``qemu-img convert -O vmdk`` (monolithicSparse and
streamOptimized), are imported, boot through SeaBIOS (no kernel of kasou's), run the writer, are
exported as an OVA and imported back, and the copy boots and finds every acknowledged write.

A Debian guest (the ``debian`` image, when built on this host) is booted the same way by the test
marked ``debian`` at the end.
"""

from __future__ import annotations

import gzip
import os
import shutil
import subprocess
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.conftest import Kasou, qemu_pids_of
from tests.ovf_samples import Disk, make_ova, vmdk, vmware_ovf

pytestmark = [pytest.mark.qemu, pytest.mark.shares_machine]  # beside the fast tests (scripts/test.sh): no timing

GRUB_CFG = """set timeout=0
set default=0
menuentry "kasou tiny" {{
  linux /boot/vmlinuz {args}
  initrd /boot/initrd.gz
}}
"""


def bootable_tiny(images: Path, out: Path) -> tuple[Path, Path]:
    """The tiny guest as two raw disks: a BIOS-bootable system disk and its ext4 data disk."""
    from kasou.image import load_image

    for tool in ("grub-mkrescue", "xorriso", "cpio"):
        assert shutil.which(tool), f"{tool} is missing: scripts/install.sh installs it (grub-pc-bin, xorriso, cpio)"
    art = load_image(images, "tiny")
    root, iso = out / "initrd", out / "iso"
    (iso / "boot" / "grub").mkdir(parents=True)
    root.mkdir()
    cpio = subprocess.run(["cpio", "-id", "--quiet"], input=gzip.decompress(art.initrd.read_bytes()), cwd=root,
                          check=True, timeout=60)  # fmt: skip
    assert cpio.returncode == 0
    rc = root / "etc" / "kasou" / "rc"
    rc.write_text(rc.read_text().replace("/dev/vda", "/dev/vdb"))  # its data disk is the second one here
    files = subprocess.run(["find", "."], cwd=root, capture_output=True, check=True, timeout=60).stdout
    packed = subprocess.run(["cpio", "-o", "-H", "newc", "--quiet"], input=files, cwd=root, capture_output=True,
                            check=True, timeout=60).stdout  # fmt: skip
    (iso / "boot" / "initrd.gz").write_bytes(gzip.compress(packed, compresslevel=1))
    shutil.copy(art.kernel, iso / "boot" / "vmlinuz")
    (iso / "boot" / "grub" / "grub.cfg").write_text(GRUB_CFG.format(args=art.kernel_args))
    boot = out / "boot.raw"
    subprocess.run(["grub-mkrescue", "-o", str(boot), str(iso)], check=True, capture_output=True, timeout=120)
    size = boot.stat().st_size
    with open(boot, "ab") as f:  # whole MiB, as a disk would be
        f.truncate((size + (1 << 20) - 1) >> 20 << 20)
    data = out / "data.raw"
    shutil.copy(art.disk, data)
    return boot, data


@pytest.fixture(scope="module")
def appliance(tiny_image: Path) -> Iterator[tuple[Path, Path]]:
    """The tiny appliance's disks as vmdk: disk0 monolithicSparse, disk1 streamOptimized."""
    out = Path(tempfile.mkdtemp(prefix="kasou-appl-", dir="/tmp"))
    try:
        boot, data = bootable_tiny(tiny_image, out)
        yield vmdk(boot, out / "tiny-boot.vmdk", "monolithicSparse"), vmdk(data, out / "tiny-data.vmdk")
    finally:
        shutil.rmtree(out, ignore_errors=True)


def seqs_of(log: str) -> list[int]:
    return [int(ln.split()[1]) for ln in log.splitlines() if ln.startswith("seq ")]


def test_a_vmdk_appliance_boots_after_import_and_after_an_ova_round_trip(
    kasou: Kasou, appliance: tuple[Path, Path]
) -> None:
    transfer = kasou.paths.transfer
    for f in appliance:
        shutil.copy(f, transfer / f.name)
    r = kasou.run("vm", "import", "appl", "--disk", "tiny-boot.vmdk", "--disk", "tiny-data.vmdk", "--memory", "128",
                  "--start", timeout=300)  # fmt: skip
    out = r.stdout
    assert "disk0     tiny-boot.vmdk (vmdk monolithicSparse" in out, out
    assert "disk1     tiny-data.vmdk (vmdk streamOptimized, 64 MiB)" in out, out
    assert "firmware  BIOS (default)" in out and "vm appl: imported and started on" in out, out
    vm = kasou.wait_ready("appl", timeout=120)
    assert vm["image"] is None and [d["format"] for d in vm["disks"]] == ["qcow2", "qcow2"]
    [pid] = qemu_pids_of(kasou.home)
    args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    assert b"-kernel" not in args  # the firmware booted the imported disk
    kasou.wait_for("seq lines", lambda: len(kasou.seqs("appl")) >= 5)
    assert "recovered 0" in kasou.log("appl")
    kasou.run("vm", "shutdown", "appl", "--timeout", "60")
    last = kasou.seqs("appl")[-1]

    r = kasou.run("vm", "export", "appl", "--ova", "appl.ova", timeout=300)
    assert "vm appl: exported to" in r.stdout, r.stdout
    ova = transfer / "appl.ova"
    with tarfile.open(ova) as tar:
        assert tar.getnames() == ["appl.ovf", "appl.mf", "appl-disk0.vmdk", "appl-disk1.vmdk"]

    r = kasou.run("vm", "import", "appl2", "--ova", "appl.ova", "--start", timeout=300)
    assert "memory    128 MiB (the OVF)" in r.stdout and "net0      E1000 Ethernet adapter" in r.stdout, r.stdout
    kasou.wait_ready("appl2", timeout=120)
    log = kasou.wait_for("recovered line", lambda: [ln for ln in kasou.log("appl2").splitlines()
                                                    if ln.startswith("recovered")])  # fmt: skip
    assert int(log[0].split()[1]) >= last  # every write the original acknowledged is on the copy
    kasou.wait_for("seq lines of the copy", lambda: len(kasou.seqs("appl2")) >= 3)
    kasou.run("vm", "stop", "appl2")


def test_a_corrupt_vmdk_is_one_line_and_leaves_nothing(kasou: Kasou, appliance: tuple[Path, Path]) -> None:
    transfer = kasou.paths.transfer
    data = bytearray(appliance[1].read_bytes())
    data[len(data) // 2 : len(data) // 2 + 4096] = os.urandom(4096)  # inside the compressed grains
    (transfer / "broken.vmdk").write_bytes(bytes(data[: len(data) - 1024]))  # and its footer cut off
    r = kasou.run("vm", "import", "broken", "--disk", "broken.vmdk", "--memory", "128", check=False)
    assert r.returncode == 1, r.stdout
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: cannot convert broken.vmdk (vmdk): "), r.stderr
    assert kasou.json("vm", "list") == []
    assert not [p for p in kasou.paths.disks.rglob("*") if p.is_file()]
    assert sorted(p.name for p in transfer.iterdir()) == ["broken.vmdk"]


DEBIAN = Path("/var/lib/kasou/images/debian")


@pytest.mark.debian
@pytest.mark.scenario  # minutes under TCG: run with the scenarios (it builds the debian image if this host has not)
@pytest.mark.timeout(2400)
def test_a_vmware_ova_of_the_debian_image_boots_under_uefi_secure_boot(kasou: Kasou, tmp_path: Path) -> None:
    """An OVA as VMware writes it (streamOptimized vmdk, vmw:Config firmware=efi and Secure Boot on): the
    import maps it to uefi-secure, and the guest itself reports Secure Boot enforcing to its writer."""
    import json

    if not (DEBIAN / "manifest.json").is_file():
        kasou.run("image", "build", "debian", timeout=2700)
    manifest = json.loads((DEBIAN / "manifest.json").read_text())
    disk = DEBIAN / manifest["disk"]
    vmdk_file = tmp_path / "debian-disk1.vmdk"
    subprocess.run(["qemu-img", "convert", "-q", "-f", manifest.get("disk_format", "qcow2"), "-O", "vmdk", "-o",
                    "subformat=streamOptimized", str(disk), str(vmdk_file)], check=True, timeout=900)  # fmt: skip
    size_gib = int(manifest["disk_size_bytes"]) / (1 << 30)
    ovf = vmware_ovf(name="deb", disks=[Disk("debian-disk1.vmdk", vmdk_file.stat().st_size, size_gib)], cpus=1,
                     memory_mib=1024, firmware="efi", secure_boot=True, os_type="debian12_64Guest")  # fmt: skip
    make_ova(kasou.paths.transfer / "deb.ova", ovf, [("debian-disk1.vmdk", vmdk_file)], ovf_name="deb.ovf")
    vmdk_file.unlink()
    out = kasou.run("vm", "import", "deb", "--ova", "deb.ova", "--start", timeout=900).stdout
    assert "UEFI with Secure Boot (the OVF: vmw:Config firmware=efi, Secure Boot)" in out, out
    kasou.wait_for("the writer's first seq", lambda: len(kasou.seqs("deb")) >= 1, timeout=900)
    assert "secureboot 1" in kasou.log("deb"), kasou.log("deb")[-2000:]
    kasou.run("vm", "stop", "deb")
