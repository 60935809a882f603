"""The QEMU guest agent of the debian image (``qemu-guest-agent`` runs in it), through a host's agent, on
one boot: the agent answers, the guest object shows the host name and the user network's address, a
snapshot freezes the guest's file systems (application-consistent) and the guest writes on afterwards
(thawed), and a shutdown goes through the guest agent.

Slow under TCG (a minute or two), and what it checks is in the default suite through the CLI already
(``test_debian_image.py``: the agent in ``vm show``, an application-consistent snapshot, a shutdown through
the agent, and the host name and address cloud-init gave it, from the agent), so it runs with the
scenarios (``-m scenario``) to keep the default suite within its 30 minutes. Run under the machine's QEMU lock:
``flock /tmp/kasou-qemu.lock .venv/bin/pytest -s -m scenario tests/integration/test_guest_agent_debian.py``.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import pytest

from kasou.hypervisor.base import LaunchDisk, LaunchSpec, RuntimeState
from kasou.hypervisor.snapshots import SnapshotDiskNow, SnapshotTake
from kasou.model.spec import USER_NETWORK, NicSpec
from tests.integration.qemu_rig import AgentHost, end_processes, scratch, seqs, wait_for
from tests.integration.test_firmware_debian import debian_disk  # noqa: F401 - the cached image's fixture

pytestmark = [pytest.mark.qemu, pytest.mark.debian, pytest.mark.scenario, pytest.mark.timeout(900)]

BOOT_TIMEOUT_S = 400  # BIOS, GRUB and systemd under TCG on a loaded 2-core machine (30-60 s when idle)
SHUTDOWN_TIMEOUT_S = 180
NAME = "deb-qga"


async def test_debian_guest_agent(tiny_image: Path, debian_disk: Path) -> None:  # noqa: F811
    root = scratch("kasou-qga-")
    h = AgentHost.make(root, "h", tiny_image, NAME)
    await h.driver.attach_all()
    try:
        disk = h.disks / NAME / "disk0.qcow2"
        disk.parent.mkdir(parents=True)
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(debian_disk), str(disk)],
                       check=True, timeout=60)  # fmt: skip
        spec = LaunchSpec(
            name=NAME, uuid="5eb1a5e0-0000-4000-8000-0000000000a9", vcpus=1, memory_mib=512, cpu="x86-64-v2-AES",
            machine="pc-q35-7.2", disks=[LaunchDisk(id="disk0", path=str(disk))],
            nics=[NicSpec(id="net0", mac="52:54:00:12:34:a9", network=USER_NETWORK)],
        )  # fmt: skip
        t0 = time.monotonic()
        await h.client.start(spec)

        async def answering() -> bool:
            return (await h.client.info(NAME)).guest.agent

        await wait_for("the debian guest's agent to answer", answering, BOOT_TIMEOUT_S)
        t_agent = time.monotonic() - t0

        async def addressed() -> bool:
            g = (await h.client.info(NAME)).guest
            return bool(g.hostname) and "10.0.2.15" in g.ips

        await wait_for("the guest's host name and address through its agent", addressed, 120)
        info = await h.client.info(NAME)
        print(f"\n[debian, BIOS, TCG] guest agent answers {t_agent:.0f} s after start; guest {info.guest}")
        assert info.guest_ready and info.guest.os and "Debian" in info.guest.os
        assert info.guest.agent_age_s is not None and info.guest.agent_age_s < 10

        async def writing() -> bool:
            return len(h.seqs()) >= 2

        await wait_for("the debian guest's writer", writing, 120)
        t1 = time.monotonic()
        taken = await h.client.take_snapshot(
            NAME, SnapshotTake(snapshot="s1", disks=[SnapshotDiskNow(id="disk0", path=str(disk))])
        )
        print(f"[debian] snapshot with fsfreeze: {taken.consistency}, {time.monotonic() - t1:.2f} s")
        assert taken.consistency == "application"
        n = seqs(h.log())[-1]

        async def thawed() -> bool:  # the writer fsyncs every line: a frozen guest would write no more
            return seqs(h.log())[-1] >= n + 2

        await wait_for("the guest to write on after the snapshot (thawed)", thawed, 60)

        t2 = time.monotonic()
        await h.client.action(NAME, "guest-shutdown")

        async def gone() -> bool:
            return (await h.client.info(NAME)).state in (RuntimeState.EXITED, RuntimeState.CRASHED)

        await wait_for("the guest to power off through its agent", gone, SHUTDOWN_TIMEOUT_S)
        final = await h.client.info(NAME)
        print(f"[debian] shutdown through the guest agent: {time.monotonic() - t2:.1f} s ({final.exit_reason})")
        assert final.state == RuntimeState.EXITED, final
        assert "KASOU-SHUTDOWN" in h.log()  # the guest shut down cleanly (its writer said so)
    finally:
        await h.close()
        await end_processes(root)
        shutil.rmtree(root, ignore_errors=True)
