"""High availability on a 3-host lab with real tiny guests (the writer): a host killed, a host cut
off, the control plane's host killed. No VM may ever run twice, and no acknowledged write is lost."""

from __future__ import annotations

import os
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from kasou.lab.watch import DoubleRunWatch, qemu_copies
from tests.integration.test_cluster import KASOU, Lab

pytestmark = pytest.mark.qemu

HOSTS = ("h1", "h2", "h3")


@pytest.fixture(scope="module")
def lab(tiny_image: Path) -> Iterator[Lab]:
    lab_dir = Path(tempfile.mkdtemp(prefix="kasou-halab-", dir="/tmp"))
    env = dict(os.environ, KASOU_LAB_DIR=str(lab_dir), KASOU_IMAGES=str(tiny_image))
    for k in ("KASOU_API", "KASOU_TOKEN", "KASOU_HOME"):
        env.pop(k, None)
    try:
        subprocess.run([*KASOU, "lab", "up", "--hosts", "3"], env=env, check=True, capture_output=True, timeout=180)
        yield Lab(lab_dir, env)
    finally:
        subprocess.run([*KASOU, "lab", "down"], env=env, capture_output=True, timeout=180)


def place_on(lab: Lab, names: list[str], host: str, via: str) -> None:
    """Start HA VMs on ``host``: they are defined while the other hosts are in maintenance, so
    placement picks it; they start once the others are back (N+1 admission counts on them)."""
    others = [h for h in HOSTS if h != host]
    for h in others:
        lab.run("host", "maintenance", h, host=via)
    try:
        for n in names:
            lab.run("vm", "create", n, "--image", "tiny", "--shared", "--ha", host=via)
    finally:
        for h in others:
            lab.run("host", "maintenance", h, "--off", host=via)
    for n in names:
        lab.run("vm", "start", n, host=via)
    for n in names:
        assert lab.ready(n, host=via)["host"] == host


def last_seq(lab: Lab, host: str, vm: str) -> int:
    seqs = lab.seqs(host, vm)
    return seqs[-1] if seqs else -1


def recovered_after_restart(lab: Lab, host: str, vm: str) -> int | None:
    lines = [ln for ln in lab.serial(host, vm) if ln.startswith("recovered ")]
    return int(lines[-1].split()[1]) if lines else None


def restarted_elsewhere(lab: Lab, names: list[str], dead: str, via: str) -> dict[str, str]:
    def check() -> dict[str, str] | None:
        vms = {n: lab.vm(n, host=via) for n in names}
        if all(v["host"] != dead and v["state"] == "running" and v["guest_ready"] for v in vms.values()):
            return {n: v["host"] for n, v in vms.items()}
        return None

    return dict(lab.wait("the HA VMs running again elsewhere", check, timeout=120))


def non_leader(lab: Lab) -> tuple[str, str]:
    leader = lab.json("cluster", host="h1")["leader"]
    victim = next(h for h in reversed(HOSTS) if h != leader)
    return victim, leader


def revive(lab: Lab, host: str) -> None:
    subprocess.run([*KASOU, "lab", "partition", host, "--heal"], env=lab.base_env, capture_output=True, timeout=60)
    subprocess.run([*KASOU, "lab", "revive", host], env=lab.base_env, capture_output=True, timeout=180)
    lab.wait(
        f"{host} up again",
        lambda: any(h["name"] == host and h["state"] == "up" for h in lab.json("host", "list", host="h1")),
    )


def delete_all(lab: Lab, names: list[str], via: str) -> None:
    for n in names:
        lab.run("vm", "delete", n, "--force", host=via, check=False)


def test_killed_host_ha_vms_restart_elsewhere_with_no_lost_write(lab: Lab) -> None:
    victim, via = non_leader(lab)
    names = ["emr", "pacs", "lab", "pharm"]
    place_on(lab, names, victim, via)
    lab.wait("writes on every guest", lambda: all(last_seq(lab, victim, n) >= 3 for n in names), timeout=60)
    with DoubleRunWatch(names) as watch:
        subprocess.run([*KASOU, "lab", "kill", victim], env=lab.base_env, check=True, capture_output=True, timeout=60)
        t_kill = time.monotonic()
        before = {n: last_seq(lab, victim, n) for n in names}
        try:
            where = restarted_elsewhere(lab, names, victim, via)
            took = time.monotonic() - t_kill
            for n, h in where.items():
                lab.wait(f"{n} recovered line", lambda n=n, h=h: recovered_after_restart(lab, h, n) is not None)
                rec = recovered_after_restart(lab, h, n)
                assert rec is not None
                assert rec >= before[n], f"{n}: recovered {rec} < last seq {before[n]} before the kill"
                events = [e["event"] for e in lab.json("vm", "history", n, host=via)]
                assert events[-3:] == ["crashed", "fenced", "restarted"], events
            print(f"failover of 4 VMs: {took:.1f} s to all guests ready")
        finally:
            revive(lab, victim)
    assert watch.doubles == []
    delete_all(lab, names, via)


def test_partitioned_host_fences_before_restart_and_rejoins_empty(lab: Lab) -> None:
    victim, via = non_leader(lab)
    names = ["ris", "dicom"]
    place_on(lab, names, victim, via)
    with DoubleRunWatch(names) as watch:
        subprocess.run([*KASOU, "lab", "partition", victim], env=lab.base_env, check=True, capture_output=True)
        try:
            # the guard kills them on the cut-off host before the lease expires elsewhere
            lab.wait("the fence on the cut-off host", lambda: sum(qemu_copies(names).values()) == 0, timeout=30)
            restarted_elsewhere(lab, names, victim, via)
        finally:
            subprocess.run([*KASOU, "lab", "partition", victim, "--heal"], env=lab.base_env, capture_output=True)
        lab.wait(f"{victim} rejoined", lambda: any(h["name"] == victim and h["state"] == "up"
                                                   for h in lab.json("host", "list", host=via)))  # fmt: skip
    assert watch.doubles == []
    host = next(h for h in lab.json("host", "list", host=via) if h["name"] == victim)
    assert host["vms_running"] == 0
    for n in names:
        assert lab.vm(n, host=via)["host"] != victim
    delete_all(lab, names, via)


def test_leader_host_killed_the_new_leader_restarts_its_vms(lab: Lab) -> None:
    leader = lab.json("cluster", host="h1")["leader"]
    via = next(h for h in HOSTS if h != leader)
    place_on(lab, ["billing"], leader, via)
    subprocess.run([*KASOU, "lab", "kill", leader], env=lab.base_env, check=True, capture_output=True, timeout=60)
    try:
        where = restarted_elsewhere(lab, ["billing"], leader, via)
        assert where["billing"] != leader
        assert lab.json("cluster", host=via)["leader"] != leader
    finally:
        revive(lab, leader)
    delete_all(lab, ["billing"], via)
