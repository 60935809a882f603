"""The debian image (Debian 12 from Debian's packages) through kasou on real QEMU under TCG, BIOS.

One boot under TCG takes over a minute, so one VM shows it all: made as a hospital makes them (a template
with an SSH key and user-data, a linked clone of it given its own host name and address, which cloud-init
applies at its first boot), it boots, writes, answers through its guest agent, is snapshotted with its file
systems frozen, shuts down gracefully and boots again with every acknowledged write. (Under UEFI with Secure
Boot and a TPM: tests/integration/test_firmware_debian.py.) ``-m debian``
selects these tests. The image is built once per machine (``kasou image build
debian``, cached in the images directory like ``tiny``); a cold build downloads about 170 MB of
packages from the host's Debian mirror.
"""

from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path

import pytest

from kasou.hypervisor import guestfiles
from kasou.hypervisor.rawview import raw_view
from tests.integration.conftest import KASOU, Kasou

BUILD_TIMEOUT_S = 1800  # a cold build takes 1-2.5 minutes here (docs/images.md); a slow mirror, more
BOOT_TIMEOUT_S = 420  # to the writer's first "seq" under TCG on a loaded 2-core machine
# The first test also builds the image (its fixture's time counts against the test's timeout).
# shares_machine: beside the fast tests in scripts/test.sh (a boot-bound guest with minutes of timeouts, its own home)
pytestmark = [pytest.mark.qemu, pytest.mark.debian, pytest.mark.shares_machine,
              pytest.mark.timeout(BUILD_TIMEOUT_S + 2 * BOOT_TIMEOUT_S)]  # fmt: skip


@pytest.fixture(scope="session")
def debian_image(tiny_image: Path) -> Path:
    """The images directory, with the debian image built (or found cached) in it."""
    t0 = time.monotonic()
    r = subprocess.run([*KASOU, "image", "build", "debian"], capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)
    assert r.returncode == 0, r.stderr
    print(f"\nkasou image build debian: {time.monotonic() - t0:.0f} s; {r.stdout.strip()}")
    return tiny_image


def _lines(text: str) -> list[str]:
    return [ln.strip() for ln in text.splitlines()]


USER_DATA = """#cloud-config
runcmd:
  - [sh, -c, "echo \\"cloud-init $(hostname) $(ip -4 -o addr show scope global | awk '{print $4}' | head -n1) keys $(cat /home/*/.ssh/authorized_keys 2>/dev/null | grep -c it@hospital)\\" > /dev/ttyS0"]
"""
SSH_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIH0cLnH5xpKh0V2mZ7+Jfj2n3l3k4Z7J2Uq0o6Tz0K9r it@hospital\n"


def test_debian_boots_through_kasou_and_keeps_every_acknowledged_write(
    kasou: Kasou, debian_image: Path, tmp_path: Path
) -> None:
    """A clone of a cloud-init template: BIOS, GRUB, systemd, cloud-init, the writer; its guest agent; a frozen
    snapshot; a graceful shutdown; the writes are on the stopped disk."""
    key, ud = tmp_path / "it.pub", tmp_path / "user-data"
    key.write_text(SSH_KEY)
    ud.write_text(USER_DATA)
    kasou.run("vm", "create", "emr-tpl", "--image", "debian", "--memory", "512", "--ssh-key", str(key),
              "--user-data", str(ud))  # fmt: skip
    kasou.run("vm", "template", "emr-tpl")
    t0 = time.monotonic()
    kasou.run("vm", "create", "deb1", "--from", "emr-tpl", "--memory", "512", "--hostname", "ward3-emr",
              "--ip", "10.0.2.50/24", "--gateway", "10.0.2.2", "--start", timeout=300)  # fmt: skip
    created = time.monotonic() - t0  # the linked clone made, QEMU started
    shown = kasou.vm("deb1")["cloud_init"]
    assert shown["hostname"] == "ward3-emr" and shown["ssh_keys"] == ["ssh-ed25519 it@hospital"], shown
    first_seq = kasou.wait_for("the first seq", lambda: kasou.seqs("deb1") and time.monotonic() - t0,
                               timeout=BOOT_TIMEOUT_S, every=1)  # fmt: skip
    vm = kasou.wait_ready("deb1", timeout=BOOT_TIMEOUT_S)
    ready = time.monotonic() - t0
    assert vm["state"] == "running"
    assert vm["disks"][0]["size_bytes"] == 4 * 1024**3
    line = kasou.wait_for("the guest's cloud-init line",
                          lambda: re.search(r"cloud-init (\S+) (\S+) keys (\d+)", kasou.log("deb1")),
                          timeout=BOOT_TIMEOUT_S, every=2)  # fmt: skip
    assert line.groups() == ("ward3-emr", "10.0.2.50/24", "1"), kasou.log("deb1")[-3000:]
    kasou.wait_for("seq lines", lambda: len(kasou.seqs("deb1")) >= 3, timeout=60, every=1)
    log = _lines(kasou.log("deb1"))
    for line_ in ("firmware bios", "secureboot 0", "tpm 0", "recovered 0", "KASOU-READY"):
        assert line_ in log, f"{line_!r} missing from the console: {log[-40:]}"
    assert log.index("KASOU-READY") < next(i for i, ln in enumerate(log) if ln.startswith("seq "))
    print(f"\ndebian under kasou (TCG, BIOS), seconds after vm create: created and started {created:.1f}, "
          f"first seq {first_seq:.1f}, guest ready {ready:.1f}")  # fmt: skip

    # Its QEMU guest agent: vm show has what the guest says of itself; a snapshot freezes its file systems.
    g = kasou.wait_for("the guest agent", lambda: (v := kasou.vm("deb1"))["guest"]["agent"] and v["guest"], timeout=180,
                       every=1)  # fmt: skip
    g = kasou.wait_for("the guest's address", lambda: "10.0.2.50" in (v := kasou.vm("deb1"))["guest"]["ips"] and v,
                       timeout=120, every=1)["guest"]  # fmt: skip
    assert "Debian" in (g["os"] or "") and g["hostname"] == "ward3-emr", g  # cloud-init's, as the agent tells
    taken = kasou.run("snapshot", "create", "deb1", "s1").stdout
    assert "application-consistent" in taken, taken
    assert [s["consistency"] for s in kasou.json("snapshot", "list", "deb1")] == ["application"]
    n = kasou.seqs("deb1")[-1]  # each seq is fsync'd: a guest left frozen would write no more
    kasou.wait_for("seq after the snapshot (thawed)", lambda: kasou.seqs("deb1")[-1] >= n + 3, timeout=60)

    # The graceful shutdown goes through the guest agent: systemd stops the writer (it says so) and powers off.
    t1 = time.monotonic()
    kasou.run("vm", "shutdown", "deb1", "--timeout", "120", timeout=180)
    took = time.monotonic() - t1
    print(f"graceful shutdown {took:.1f} s")
    assert took < 60, f"the guest took {took:.0f} s to power off (a stop job hung?)"
    assert kasou.vm("deb1")["state"] == "stopped"
    assert kasou.json("vm", "history", "deb1")[-1]["detail"] == "graceful shutdown (through the guest agent)"
    log = _lines(kasou.log("deb1"))
    assert "KASOU-SHUTDOWN" in log
    oops = [ln for ln in log if "Call Trace" in ln or "invalid opcode" in ln or "Kernel panic" in ln]
    assert not oops, f"the guest's kernel complained: {oops}"  # e.g. a CPU model TCG cannot run
    last = kasou.seqs("deb1")[-1]

    # Every acknowledged write is on the stopped disk: its file system read offline, read-only (as a single-file
    # restore reads a generation), not by a second boot (a minute under TCG; the tiny guest's tests boot again).
    t1 = time.monotonic()
    disk = Path(str(kasou.vm("deb1")["disks"][0]["path"]))
    with raw_view(disk, "qcow2", tmp_path) as raw:
        written = guestfiles.read_file(raw, "/var/lib/kasou/seq.log").decode()
    kept = [int(ln) for ln in written.splitlines() if ln.strip().isdigit()]
    print(f"seq.log read offline {time.monotonic() - t1:.1f} s: {len(kept)} lines, the last {max(kept, default=0)}")
    assert kept and kept[-1] >= last, f"the last acknowledged seq {last} is not on the disk: {written[-200:]!r}"
    kasou.run("vm", "delete", "deb1")
    kasou.run("vm", "delete", "emr-tpl")
    assert kasou.json("vm", "list") == []
