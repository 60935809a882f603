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
    return dict(lab.wait(f"{vm}'s guest agent", lambda: (v := lab.vm(vm))["guest"]["agent"] and v, BOOT_TIMEOUT_S))


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
