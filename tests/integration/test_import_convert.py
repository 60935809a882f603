"""``kasou vm import --convert`` with the real virt-v2v on the Debian image, booted afterwards.

A scenario (minutes under TCG, not in CI): virt-v2v boots libguestfs's appliance with QEMU, so it runs
under the QEMU lock like every real-QEMU test. It installs what virt-v2v needs if this host lacks it
(Debian's ``virt-v2v`` and ``nbdkit``, and a kernel in /boot for the appliance), as
bench/start_latency.py installs libvirt: CI does not carry these ~100 packages.

    flock /tmp/kasou-qemu.lock pytest -p no:cacheprovider -s -m scenario tests/integration/test_import_convert.py
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from tests.integration.conftest import Kasou

pytestmark = [pytest.mark.qemu, pytest.mark.debian, pytest.mark.scenario]

DEBIAN = Path("/var/lib/kasou/images/debian")


def install_virt_v2v() -> None:
    """virt-v2v, nbdkit and a kernel for libguestfs's appliance (supermin takes the host's from /boot)."""
    packages = [p for p, tool in (("virt-v2v", "virt-v2v-in-place"), ("nbdkit", "nbdkit")) if not shutil.which(tool)]
    if not list(Path("/boot").glob("vmlinuz-*")):
        packages.append("linux-image-cloud-amd64")
    if packages:
        subprocess.run(["apt-get", "update", "-qq"], check=True, timeout=600)
        subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *packages], check=True,
                       timeout=1800, env={"DEBIAN_FRONTEND": "noninteractive", "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"})  # fmt: skip


@pytest.mark.timeout(3600)
def test_a_vmdk_of_the_debian_image_is_converted_by_virt_v2v_and_boots(kasou: Kasou, tmp_path: Path) -> None:
    assert (DEBIAN / "manifest.json").is_file(), "the debian image is not built here: kasou image build debian"
    install_virt_v2v()
    manifest = json.loads((DEBIAN / "manifest.json").read_text())
    vmdk = kasou.paths.transfer / "debian.vmdk"
    subprocess.run(["qemu-img", "convert", "-q", "-f", manifest.get("disk_format", "qcow2"), "-O", "vmdk", "-o",
                    "subformat=monolithicSparse", str(DEBIAN / manifest["disk"]), str(vmdk)], check=True,
                   timeout=900)  # fmt: skip
    started = time.monotonic()
    r = kasou.run("vm", "import", "deb", "--disk", "debian.vmdk", "--memory", "1024", "--convert", "--start",
                  timeout=3000)  # fmt: skip
    took = time.monotonic() - started
    out = r.stdout
    print(out)
    assert "convert   virt-v2v in place: VMware drivers and tools out, virtio drivers in" in out, out
    assert re.search(r"v2v +converted 12\.\d+ to run on KVM", out), out  # libguestfs names Debian by its version
    m = re.search(r"v2v +virt-v2v took ([0-9.]+) s", out)
    assert m, out
    print(f"import --convert of the debian image: virt-v2v {m.group(1)} s, the whole import {took:.0f} s")
    kasou.wait_for("the writer's first seq", lambda: len(kasou.seqs("deb")) >= 1, timeout=900)
    booted = time.monotonic() - started
    print(f"the converted VM's writer wrote its first seq {booted:.0f} s after the import began")
    kasou.run("vm", "stop", "deb")
    assert not [p for p in (kasou.paths.disks.parent / "v2v").iterdir() if p.name != "cache"]  # its scratch is gone
