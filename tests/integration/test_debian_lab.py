"""Real guests on the 3-host lab: the debian image, BIOS on a local disk and UEFI Secure Boot with a TPM on
shared storage, live-migrated while their writers write; after each move the guest agent still answers and
the writer's counter goes on without a gap; then host maintenance empties the UEFI VM's host with no stop.

Minutes under TCG: a scenario (``-m scenario``), run before an issue about real guests is resolved, under
the machine's QEMU lock: ``flock /tmp/kasou-qemu.lock .venv/bin/pytest -s -m scenario
tests/integration/test_debian_lab.py``.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.test_cluster import Lab, make_lab

pytestmark = [pytest.mark.qemu, pytest.mark.debian, pytest.mark.scenario, pytest.mark.timeout(2400)]

BOOT_TIMEOUT_S = 600


@pytest.fixture(scope="module")
def lab(tiny_image: Path) -> Iterator[Lab]:
    if not (tiny_image / "debian" / "manifest.json").is_file():
        import subprocess
        import sys

        subprocess.run([sys.executable, "-m", "kasou", "image", "build", "debian"], check=True, timeout=2700)
    yield from make_lab(tiny_image, prefix="kasou-deblab-")


def agent_answers(lab: Lab, vm: str) -> dict[str, object]:
    try:
        return dict(lab.wait(f"{vm}'s guest agent", lambda: (v := lab.vm(vm))["guest"]["agent"] and v, BOOT_TIMEOUT_S))
    except AssertionError as e:  # what the guest printed says why (its serial console, on its host)
        host = str(lab.vm(vm).get("host"))
        raise AssertionError(f"{e}; the end of its console on {host}:\n{lab.serial(host, vm)[-3000:]}") from None


def other(lab: Lab, host: str) -> str:
    return next(h for h in ("h1", "h2", "h3") if h != host and any(
        x["name"] == h and x["state"] == "up" for x in lab.json("host", "list")))  # fmt: skip


def test_debian_guests_migrate_with_their_agent_and_counter_and_a_host_is_emptied(lab: Lab) -> None:
    lab.run("vm", "create", "deb-bios", "--image", "debian", "--memory", "512", "--start", timeout=600)
    lab.run("vm", "create", "deb-uefi", "--image", "debian", "--memory", "512", "--shared", "--firmware",
            "uefi-secure", "--tpm", "--start", timeout=600)  # fmt: skip
    for vm in ("deb-bios", "deb-uefi"):
        v = agent_answers(lab, vm)
        lab.wait(f"{vm} writing", lambda vm=vm, h=str(v["host"]): len(lab.seqs(h, vm)) >= 5, BOOT_TIMEOUT_S)
    first = lab.serial(str(lab.vm("deb-uefi")["host"]), "deb-uefi")
    assert "secureboot 1" in first and "tpm 1" in first, first[-2000:]
    for vm, storage in (("deb-bios", "local disk copied"), ("deb-uefi", "shared storage")):
        src = str(lab.vm(vm)["host"])
        dst = other(lab, src)
        t0 = time.monotonic()
        out = lab.run("vm", "migrate", vm, "--to", dst, timeout=900).stdout
        took = time.monotonic() - t0
        assert f"-> {dst}" in out, out
        lab.assert_counter_continues(vm, src, dst)
        v = lab.vm(vm)
        assert v["host"] == dst and v["state"] == "running"
        g = lab.wait(f"{vm}'s agent on {dst}", lambda vm=vm: (x := lab.vm(vm)["guest"])["agent"]
                     and (x["agent_age_s"] or 99) < 10 and x, 120)  # fmt: skip
        print(f"{vm} ({storage}): {src} -> {dst} in {took:.1f} s ({out.strip()}); agent answers: {g['hostname']}")
    host = str(lab.vm("deb-uefi")["host"])
    history_before = len(lab.json("vm", "history", "deb-uefi"))
    t0 = time.monotonic()
    lab.run("host", "maintenance", host, timeout=1200)
    v = lab.wait("deb-uefi moved off the host", lambda: (x := lab.vm("deb-uefi"))["host"] != host and x, 600)
    print(f"maintenance of {host}: deb-uefi on {v['host']} after {time.monotonic() - t0:.1f} s")
    events = [e["event"] for e in lab.json("vm", "history", "deb-uefi")[history_before:]]
    assert "stopped" not in events and "crashed" not in events, events
    lab.assert_counter_continues("deb-uefi", host, str(v["host"]))
    lab.run("host", "maintenance", host, "--off")
    for vm in ("deb-bios", "deb-uefi"):
        lab.run("vm", "stop", vm)


def test_debian_memory_snapshot_backup_restore_and_a_mirror_losing_a_copy(lab: Lab) -> None:
    """The rest of what a real guest must keep: a memory snapshot it goes on from, an application-consistent
    backup whose restore boots (the UEFI VM's variables and TPM restored with it), a mirrored disk losing a copy."""
    lab.run("vm", "start", "deb-bios", timeout=600)  # stopped by the test before
    host = str(agent_answers(lab, "deb-bios")["host"])
    lab.wait("deb-bios writing", lambda: len(lab.seqs(host, "deb-bios")) >= 5, BOOT_TIMEOUT_S)

    # A snapshot with memory: the guest goes on from its moment, no reboot, its agent still answers.
    before = lab.seqs(host, "deb-bios")[-1]
    out = lab.run("snapshot", "create", "deb-bios", "s1", "--memory", timeout=600).stdout
    assert "disk and memory" in out, out  # the guest's memory is in it: consistent without a freeze
    after = lab.seqs(host, "deb-bios")[-1]
    lab.wait("more writes", lambda: lab.seqs(host, "deb-bios")[-1] >= after + 10, 120)
    assert "reverted to snapshot s1; running" in lab.run("snapshot", "revert", "deb-bios", "s1", timeout=600).stdout
    lab.wait("the reverted guest writing", lambda: len(lab.seqs(host, "deb-bios")) >= 3, 120)
    log = lab.serial(host, "deb-bios")
    assert "recovered " not in log, "the guest rebooted instead of going on from its snapshot"
    first = lab.seqs(host, "deb-bios")[0]
    assert before < first <= after + 1, (before, first, after)
    lab.wait("deb-bios's agent after the revert", lambda: lab.vm("deb-bios")["guest"]["agent"], 120)
    lab.run("snapshot", "delete", "deb-bios", "s1", timeout=600)

    # An application-consistent backup of the running guest; its restore boots and recovers the counter.
    lo = lab.seqs(host, "deb-bios")[-1]
    out = lab.run("backup", "create", "deb-bios", timeout=900).stdout
    assert "application-consistent" in out, out
    hi = lab.seqs(host, "deb-bios")[-1] + 1
    lab.run("backup", "restore", "deb-bios", "1", "--as", "deb-bios-r", timeout=900)
    lab.run("vm", "start", "deb-bios-r", timeout=600)
    rhost = str(agent_answers(lab, "deb-bios-r")["host"])
    line = lab.wait("deb-bios-r says recovered", lambda: next(
        (ln for ln in lab.serial(rhost, "deb-bios-r").splitlines() if ln.startswith("recovered ")), None), 300)  # fmt: skip
    assert lo <= int(line.split()[1]) <= hi, (lo, line, hi)
    lab.run("vm", "delete", "deb-bios-r", "--force", timeout=300)

    # A mirrored disk loses its second copy while the guest writes: degraded, an event, the guest goes on.
    for pool in ("ma", "mb"):
        lab.run("pool", "create", pool, "--path", str(lab.dir / f"pool-{pool}"))
    lab.run("vm", "create", "deb-mir", "--image", "debian", "--memory", "512", "--mirror", "ma,mb", "--start",
            timeout=600)  # fmt: skip
    host = str(agent_answers(lab, "deb-mir")["host"])
    lab.wait("deb-mir writing", lambda: len(lab.seqs(host, "deb-mir")) >= 5, BOOT_TIMEOUT_S)
    mirror = lab.vm("deb-mir")["disks"][0]["mirror"]
    assert mirror["state"] == "in_sync", mirror
    Path(mirror["path"]).unlink()
    lab.wait("degraded", lambda: lab.vm("deb-mir")["disks"][0]["mirror"]["state"] == "degraded", 60)
    assert "disk_degraded" in [e["kind"] for e in lab.json("event", "list", "--subject", "vm/deb-mir")]
    n = lab.seqs(host, "deb-mir")[-1]
    lab.wait("writes go on", lambda: lab.seqs(host, "deb-mir")[-1] >= n + 10, 120)
    assert lab.vm("deb-mir")["state"] == "running" and lab.vm("deb-mir")["guest"]["agent"]
    lab.run("vm", "delete", "deb-mir", "--force", timeout=300)

    # The UEFI Secure Boot VM with a TPM (stopped by the test before): backed up and restored, it boots with
    # Secure Boot enforcing and its TPM, from its own restored variable store and TPM state.
    lab.run("backup", "create", "deb-uefi", timeout=900)
    lab.run("backup", "restore", "deb-uefi", "1", "--as", "deb-uefi-r", timeout=900)
    lab.run("vm", "start", "deb-uefi-r", timeout=600)
    uhost = str(agent_answers(lab, "deb-uefi-r")["host"])
    lab.wait("deb-uefi-r reports its firmware", lambda: "tpm " in lab.serial(uhost, "deb-uefi-r"), 300)
    serial = lab.serial(uhost, "deb-uefi-r")
    assert "secureboot 1" in serial and "tpm 1" in serial, serial[-2000:]
    for vm in ("deb-uefi-r", "deb-uefi", "deb-bios"):
        lab.run("vm", "delete", vm, "--force", timeout=300)
