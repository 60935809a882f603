"""Replicated disks on a 3-host lab with a real tiny guest: the replica's host killed (the VM runs on,
degraded, and the replica is rebuilt), then the VM's own host killed (it restarts from the rebuilt
copy, on that copy's host, with no acknowledged write lost)."""

from __future__ import annotations

import subprocess

import pytest

from kasou.lab.watch import DoubleRunWatch
from tests.integration.test_cluster import KASOU, Lab
from tests.integration.test_ha import lab, last_seq, non_leader, recovered_after_restart, revive  # noqa: F401

pytestmark = pytest.mark.qemu


def test_replica_host_lost_then_primary_lost_no_write_lost(lab: Lab) -> None:  # noqa: F811
    victim, via = non_leader(lab)
    others = [h for h in ("h1", "h2", "h3") if h != victim]
    for h in others:  # define it on the victim's host; its replica goes elsewhere once it runs
        lab.run("host", "maintenance", h, host=via)
    try:
        lab.run("vm", "create", "emr", "--image", "tiny", "--replicated", "--ha", host=via)
    finally:
        for h in others:
            lab.run("host", "maintenance", h, "--off", host=via)
    lab.run("vm", "start", "emr", host=via)
    via_now = [via]  # the host whose API the test talks to: one that stays up throughout

    def in_sync(avoid: str | None = None) -> dict | None:
        v = lab.vm("emr", host=via_now[0])
        r = v["replica"]
        return v if r and r["state"] == "in_sync" and r["host"] not in (v["host"], avoid) else None

    v = lab.wait("the replica in sync", in_sync, timeout=120)
    primary, first_replica = v["host"], v["replica"]["host"]
    assert primary == victim
    third = next(h for h in ("h1", "h2", "h3") if h not in (primary, first_replica))
    via = via_now[0] = third  # it keeps the second replica, then runs the VM: it is never killed
    # 1. the replica's host dies: the VM runs on, degraded, and a replica is rebuilt on the third host
    subprocess.run([*KASOU, "lab", "kill", first_replica], env=lab.base_env, check=True, capture_output=True)
    try:
        seq_before = last_seq(lab, primary, "emr")
        lab.wait("the guest writing on", lambda: last_seq(lab, primary, "emr") > seq_before + 2, timeout=60)
        v = lab.wait("a rebuilt replica", lambda: in_sync(avoid=first_replica), timeout=120)
        second = v["replica"]["host"]
        assert v["host"] == primary and v["state"] == "running"
        # 2. now the VM's host dies: it restarts from the rebuilt copy, on that copy's host
        with DoubleRunWatch(["emr"]) as watch:
            lab.wait("fresh writes", lambda: last_seq(lab, primary, "emr") > seq_before + 5, timeout=60)
            subprocess.run([*KASOU, "lab", "kill", primary], env=lab.base_env, check=True, capture_output=True)
            last = last_seq(lab, primary, "emr")
            try:
                v = lab.wait(
                    "the restart from the replica",
                    lambda: (x := lab.vm("emr", host=via))["host"] == second and x["guest_ready"] and x,
                    timeout=120,
                )
                rec = recovered_after_restart(lab, second, "emr")
                assert rec is not None and rec >= last, f"recovered {rec} < last seq {last} before the kill"
                assert v["disks"][0]["path"].endswith(".replica.qcow2")
            finally:
                revive(lab, primary)
        assert watch.doubles == []
    finally:
        revive(lab, first_replica)
    lab.run("vm", "delete", "emr", "--force", host=via, check=False)
