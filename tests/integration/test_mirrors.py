"""Mirrored disks end to end through the CLI, with real QEMU and the tiny guest's writer.

``kasou vm create --mirror a,b``; one copy's file is removed while the guest writes: the guest goes
on (no ``seq`` lost), ``vm show`` says degraded and an event is raised; ``kasou disk rebuild``
builds a new copy in a third pool while the guest writes; after a clean stop both copies are
identical (``qemu-img compare``).
"""

from __future__ import annotations

import itertools
import subprocess
from pathlib import Path

from tests.integration.conftest import Kasou


def _mirror(k: Kasou, name: str) -> dict:
    return dict(k.vm(name)["disks"][0]["mirror"] or {})


def _gaps(values: list[int]) -> list[int]:
    return [b for a, b in itertools.pairwise(values) if b != a + 1]


def test_lose_a_copy_then_rebuild_online(kasou: Kasou) -> None:
    k = kasou
    for p in ("a", "b", "c"):
        k.run("pool", "create", p, "--path", str(k.pools / f"pool-{p}"))
    k.run("vm", "create", "emr", "--image", "tiny", "--mirror", "a,b", "--start")
    k.wait_ready("emr")
    k.wait_for("writes", lambda: len(k.seqs("emr")) >= 5)
    m = _mirror(k, "emr")
    assert m["state"] == "in_sync" and m["pool"] == "b", m
    first = k.vm("emr")["disks"][0]["path"]

    Path(m["path"]).unlink()  # the second copy is lost while the guest writes
    k.wait_for("degraded", lambda: _mirror(k, "emr")["state"] == "degraded", timeout=30)
    events = k.json("event", "list", "--subject", "vm/emr")
    assert [e["kind"] for e in events] == ["disk_degraded"], events
    n = k.seqs("emr")[-1]
    k.wait_for("writes go on", lambda: k.seqs("emr")[-1] >= n + 10, timeout=40)
    assert k.vm("emr")["state"] == "running"

    r = k.run("disk", "rebuild", "emr", "disk0", "--pool", "c")
    assert "two copies again" in r.stdout, r.stdout
    m = _mirror(k, "emr")
    assert m["state"] == "in_sync" and m["pool"] == "c", m
    assert [e["kind"] for e in k.json("event", "list", "--subject", "vm/emr")] == ["disk_degraded", "disk_healthy"]
    pools = {p["name"]: p for p in k.json("pool", "list")}
    assert pools["c"]["disks"] == 1 and pools["b"]["disks"] == 0

    n = k.seqs("emr")[-1]
    k.wait_for("writes go on", lambda: k.seqs("emr")[-1] >= n + 10, timeout=40)
    k.run("vm", "stop", "emr")
    seqs = k.seqs("emr")
    assert _gaps(seqs) == [], "a write was lost or repeated"
    cmp = subprocess.run(["qemu-img", "compare", "-q", first, m["path"]], timeout=60)
    assert cmp.returncode == 0, "the two copies differ after a clean stop"

    # Bad input changes nothing.
    r = k.run("disk", "rebuild", "emr", "disk0", "--pool", "a", check=False)
    assert r.returncode == 2 and "give another pool" in r.stderr, r.stderr
    r = k.run("vm", "create", "x", "--image", "tiny", "--mirror", "a,a", check=False)
    assert r.returncode == 2 and "two pools" in r.stderr, r.stderr
