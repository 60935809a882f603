"""kasou snapshot end to end (CLI -> API -> control plane -> agent -> QEMU) with the tiny guest's writer."""

from __future__ import annotations

import pytest

from tests.integration.conftest import Kasou

pytestmark = [
    pytest.mark.qemu,
    pytest.mark.shares_machine,
    pytest.mark.timeout(300),
]  # beside the fast tests (scripts/test.sh): tiny guests, no timing


def test_memory_snapshot_revert_and_delete_through_the_cli(kasou: Kasou) -> None:
    k = kasou
    k.run("vm", "create", "emr", "--image", "tiny", "--memory", "128", "--start")
    k.wait_ready("emr")
    k.wait_for("some writes", lambda: len(k.seqs("emr")) >= 5)
    before = k.seqs("emr")[-1]
    out = k.run("snapshot", "create", "emr", "s1", "--memory").stdout
    assert "snapshot s1 taken (disk and memory, guest paused" in out, out
    after = k.seqs("emr")[-1]
    [s] = k.json("snapshot", "list", "emr")
    assert s["name"] == "s1" and s["memory"] and s["newest"] and s["size_bytes"] > 0
    disk = k.vm("emr")["disks"][0]["path"]
    assert disk.endswith("/emr/disk0.s1.qcow2")
    k.wait_for("more writes", lambda: k.seqs("emr")[-1] >= after + 20)

    assert "reverted to snapshot s1; running" in k.run("snapshot", "revert", "emr", "s1").stdout
    k.wait_for("the restored guest to write", lambda: len(k.seqs("emr")) >= 3)
    log = k.log("emr")
    assert "recovered" not in log and "KASOU-READY" not in log  # no reboot: it went on from the snapshot
    first = k.seqs("emr")[0]
    assert before < first <= after + 1, (before, first, after)
    assert k.vm("emr")["state"] == "running"

    # Delete while running: the overlay is merged, the disk is one file again, the guest keeps writing.
    n = k.seqs("emr")[-1]
    assert "snapshot s1 deleted" in k.run("snapshot", "delete", "emr", "s1").stdout
    assert k.json("snapshot", "list", "emr") == []
    assert k.vm("emr")["disks"][0]["path"].endswith("/emr/disk0.qcow2")
    k.wait_for("writes after the merge", lambda: k.seqs("emr")[-1] >= n + 10)
    seqs = k.seqs("emr")
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))

    bad = k.run("snapshot", "create", "emr", "../x", check=False)
    assert bad.returncode == 2 and bad.stderr.startswith("error: snapshot '../x'"), bad.stderr
    k.run("snapshot", "create", "emr", "s2")
    k.run("vm", "delete", "emr", "--force")
    assert not list((k.paths.disks).rglob("*"))
