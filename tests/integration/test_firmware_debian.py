"""The debian image (Debian 12: shim, GRUB and kernel signed) under ``uefi-secure`` with a TPM, through a
host's agent: the guest itself reports Secure Boot enforcing and a TPM (its writer service prints
``firmware uefi``, ``secureboot 1`` and ``tpm 1`` at boot; see ``kasou image build debian``).

Slow under TCG (minutes): ``-m debian`` selects it. Run under the machine's QEMU lock:
``flock /tmp/kasou-qemu.lock .venv/bin/pytest -s -m debian tests/integration/test_firmware_debian.py``.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from kasou.agent.models import FirmwareCreate
from kasou.hypervisor.base import LaunchDisk, LaunchSpec
from tests.integration.conftest import KASOU
from tests.integration.qemu_rig import AgentHost, end_processes, scratch, wait_for

# shares_machine: beside the fast tests in scripts/test.sh (a boot-bound guest with minutes of timeouts, its own home)
pytestmark = [pytest.mark.qemu, pytest.mark.debian, pytest.mark.shares_machine, pytest.mark.timeout(900)]

BUILD_TIMEOUT_S = 2700  # a cold build downloads Debian's packages
BOOT_TIMEOUT_S = 600  # OVMF with SMM, shim, GRUB and systemd under TCG on a loaded 2-core machine
NAME = "deb-sb"


@pytest.fixture(scope="module")
def debian_disk(tiny_image: Path) -> Path:
    """The debian image's disk, built (``kasou image build debian``) if this machine has not cached it."""
    manifest = tiny_image / "debian" / "manifest.json"
    if not manifest.exists():
        r = subprocess.run([*KASOU, "image", "build", "debian"], capture_output=True, text=True,
                           timeout=BUILD_TIMEOUT_S)  # fmt: skip
        assert r.returncode == 0, f"kasou image build debian failed: {r.stderr.strip()}"
    data = json.loads(manifest.read_text())
    assert "uefi-secure" in data.get("firmware", []), data
    return tiny_image / "debian" / str(data["disk"])


async def test_debian_boots_with_secure_boot_enforcing_and_sees_its_tpm(tiny_image: Path, debian_disk: Path) -> None:
    root = scratch("kasou-fwd-")
    h = AgentHost.make(root, "h", tiny_image, NAME)
    await h.driver.attach_all()
    try:
        disk = h.disks / NAME / "disk0.qcow2"
        disk.parent.mkdir(parents=True)
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(debian_disk), str(disk)],
                       check=True, timeout=60)  # fmt: skip
        made = await h.client.create_firmware(
            FirmwareCreate(vm=NAME, beside=str(disk), firmware="uefi-secure", tpm=True)
        )
        spec = LaunchSpec(
            name=NAME, uuid="5eb1a5e0-0000-4000-8000-0000000000d5", vcpus=1, memory_mib=512, cpu="x86-64-v2-AES",
            machine="pc-q35-7.2", firmware="uefi-secure", nvram=made.nvram, tpm_state=made.tpm_state,
            disks=[LaunchDisk(id="disk0", path=str(disk))],
        )  # fmt: skip
        t0 = time.monotonic()
        await h.client.start(spec)

        async def writing() -> list[str] | None:
            lines = [ln.strip() for ln in h.log(NAME).splitlines()]
            return lines if "seq 1" in lines else None

        lines = await wait_for("the debian guest's first seq", writing, BOOT_TIMEOUT_S)
        print(f"\n[debian, uefi-secure + TPM, TCG] first seq {time.monotonic() - t0:.0f} s after start")
        for line in ("firmware uefi", "secureboot 1", "tpm 1", "KASOU-READY"):
            assert line in lines, f"{line!r} missing from the console: {lines[-40:]}"
        await h.client.action(NAME, "stop")
    finally:
        await h.close()
        await end_processes(root)
        shutil.rmtree(root, ignore_errors=True)
