"""The load balancer on a 3-host lab with real tiny guests: two VMs started on one host, ``kasou cluster balance``
moves one of them by live migration and both keep running."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.test_cluster import Lab, make_lab

pytestmark = pytest.mark.qemu  # about 50 s on an idle machine, most of it the lab coming up


@pytest.fixture(scope="module")
def lab(tiny_image: Path) -> Iterator[Lab]:
    """A lab in a short directory (``/tmp/kb????????``): its hosts' VM sockets fit under their homes
    (kasou.config.Paths.vm_run), not under /run/kasou, where the session-end clean-up of another pytest run on a
    shared machine (tests/conftest.py, _runtime_dirs_removed) would remove them from under the running VMs."""
    yield from make_lab(tiny_image, prefix="kb")


def test_balance_moves_one_of_two_vms_off_a_crowded_host(lab: Lab) -> None:
    # h2 and h3 in maintenance while the VMs are created: both start on h1.
    for h in ("h2", "h3"):
        lab.run("host", "maintenance", h)
    for name in ("emr", "pacs"):
        lab.run("vm", "create", name, "--image", "tiny", "--shared", "--memory", "2048", "--start")
    for h in ("h2", "h3"):
        lab.run("host", "maintenance", h, "--off")
    assert {lab.ready(n)["host"] for n in ("emr", "pacs")} == {"h1"}
    lab.run("cluster", "balance-settings", "--threshold", "10")
    plan = lab.json("cluster", "balance", "--dry-run")["plan"]
    assert len(plan["moves"]) == 1 and plan["moves"][0]["source"] == "h1", plan
    assert plan["spread_before"]["memory"] > 10 >= plan["spread_after"]["memory"], plan
    t0 = time.monotonic()
    r = lab.run("cluster", "balance")
    took = time.monotonic() - t0
    assert "moved h1 →" in r.stdout, r.stdout + r.stderr
    print(f"balance with one live migration: {took:.1f} s; {r.stdout.strip().splitlines()[-1]}")
    moved = plan["moves"][0]["vm"]
    after = {n: lab.ready(n) for n in ("emr", "pacs")}
    assert after[moved]["host"] == plan["moves"][0]["target"] and after[moved]["state"] == "running"
    assert [e["event"] for e in lab.json("vm", "history", moved)] == ["defined", "started", "migrated"]
    again = lab.json("cluster", "balance", "--dry-run")["plan"]
    assert again["moves"] == [] and again["summary"].startswith("balanced"), again
