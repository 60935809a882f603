"""Snapshots: the pure helpers, QMP arguments, and the QMP steps against a scripted monitor."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from kasou.control.records import VMRecord
from kasou.control.snapshots import _without_snapshot
from kasou.errors import Conflict, HypervisorError, InvalidSpec, MonitorError, WrongState
from kasou.hypervisor.qemu import blocknodes as bn
from kasou.hypervisor.qemu import snapshots as snap
from kasou.model.snapshots import SnapshotCreate, SnapshotDisk, SnapshotRecord, newer_than
from kasou.model.spec import DiskSpec

QDEV = "/machine/peripheral/disk0-dev/virtio-backend"


def block(node: str, file: str, backing: str | None = None) -> dict[str, Any]:
    image: dict[str, Any] = {"filename": file, "virtual-size": 64 << 20}
    if backing:
        image["backing-image"] = {"filename": backing}
    return {"qdev": QDEV, "device": "", "inserted": {"node-name": node, "file": file, "image": image}}


def test_top_node_is_found_by_its_device_not_its_name() -> None:
    blocks = [
        {"qdev": "/machine/peripheral/disk1-dev/virtio-backend", "inserted": {"node-name": "disk1", "file": "/d1"}},
        block("disk0-ab12", "/d/disk0.s1.qcow2", "/d/disk0.qcow2"),
    ]
    assert bn.top_of(blocks, "disk0")["node-name"] == "disk0-ab12"
    assert bn.chain_of(bn.top_of(blocks, "disk0")) == ["/d/disk0.s1.qcow2", "/d/disk0.qcow2"]
    assert bn.top_of([{"qdev": "disk0-dev", "inserted": {"node-name": "x"}}], "disk0")["node-name"] == "x"
    with pytest.raises(HypervisorError, match="no device disk2-dev"):
        bn.top_of(blocks, "disk2")
    with pytest.raises(HypervisorError, match="no medium"):
        bn.top_of([{"qdev": QDEV, "inserted": None}], "disk0")


def test_layers_by_file() -> None:
    nodes = [
        {"node-name": "disk0-ab12", "drv": "qcow2", "file": "/d/s1.qcow2", "backing_file": "/d/disk0.qcow2",
         "image": {"virtual-size": 10, "actual-size": 3}},
        {"node-name": "disk0-ab12f", "drv": "file", "file": "/d/s1.qcow2"},
        {"node-name": "disk0", "drv": "qcow2", "file": "/d/disk0.qcow2", "image": {"virtual-size": 10}},
        {"node-name": "disk0-file", "drv": "file", "file": "/d/disk0.qcow2"},
    ]  # fmt: skip
    layers = bn.layers(nodes)
    assert layers["/d/s1.qcow2"] == bn.Layer("disk0-ab12", "/d/s1.qcow2", "disk0-ab12f", "/d/disk0.qcow2", 10, 3)
    assert layers["/d/disk0.qcow2"].backing is None and layers["/d/disk0.qcow2"].file_node == "disk0-file"


def test_qmp_arguments() -> None:
    node, file_node = snap.overlay_nodes("d" * 22)
    assert len(node) <= 31 and len(file_node) <= 31 and file_node == node + "f"
    assert snap.overlay_blockdev("n", "nf", "/p") == {
        "driver": "qcow2", "node-name": "n", "file": {"driver": "file", "filename": "/p", "node-name": "nf"},
        "backing": None,
    }  # fmt: skip
    assert snap.snapshot_actions([("disk0", "disk0-ab12")]) == [
        {"type": "blockdev-snapshot", "data": {"node": "disk0", "overlay": "disk0-ab12"}}
    ]
    assert snap.commit_args("disk0", "top", "mid", "base") == {
        "job-id": "snap-disk0", "device": "top", "top-node": "mid", "base-node": "base", "auto-dismiss": False,
        "on-error": "report",
    }  # fmt: skip


def test_snapshot_names_are_kasou_names() -> None:
    assert SnapshotCreate.parse({"name": "before-upgrade.1", "memory": True}).memory
    for bad in ("a/b", "..", "", "-x", "x" * 64, "a\n"):
        with pytest.raises(InvalidSpec, match="snapshot"):
            SnapshotCreate.parse({"name": bad})
    with pytest.raises(InvalidSpec, match="memory"):
        SnapshotCreate.parse({"name": "x", "memory": "maybe"})


def _rec(*names: str) -> VMRecord:
    """A VM with a linear chain: disk0.qcow2 <- disk0.<n1>.qcow2 <- ..."""
    layers = ["/d/disk0.qcow2"] + [f"/d/disk0.{n}.qcow2" for n in names]
    snaps = [
        SnapshotRecord(name=n, disks=[SnapshotDisk(id="disk0", base=layers[i], overlay=layers[i + 1])], size_bytes=1)
        for i, n in enumerate(names)
    ]
    return VMRecord(name="vm", uuid="u", vcpus=1, memory_mib=128,
                    disks=[DiskSpec(id="disk0", size_bytes=1, path=layers[-1])], snapshots=snaps)  # fmt: skip


def test_merging_a_middle_snapshot_moves_the_next_one_onto_its_base() -> None:
    r = _rec("s1", "s2", "s3")
    assert [s.name for s in newer_than(r.snapshots, "s1")] == ["s2", "s3"]
    after = _without_snapshot(r, "s2", {"disk0": "/d/disk0.s3.qcow2"}, {"disk0": 7})
    assert [(s.name, s.disks[0].base, s.disks[0].overlay) for s in after.snapshots] == [
        ("s1", "/d/disk0.qcow2", "/d/disk0.s1.qcow2"),
        ("s3", "/d/disk0.s1.qcow2", "/d/disk0.s3.qcow2"),
    ]
    assert after.snapshots[1].size_bytes == 7 and after.disks[0].path == "/d/disk0.s3.qcow2"
    # The newest: the disk's active layer goes back to the base.
    last = _without_snapshot(after, "s3", {"disk0": "/d/disk0.s1.qcow2"}, {})
    assert [s.name for s in last.snapshots] == ["s1"] and last.disks[0].path == "/d/disk0.s1.qcow2"


async def no_fd(fdname: str, fd: int) -> None:
    """Passing a descriptor: the scripted monitor has no socket."""


class Monitor:
    """A scripted QMP monitor: answers by command, records what it was asked, fails where told."""

    def __init__(self, fail: str | None = None, status: str = "running") -> None:
        self.calls: list[tuple[str, dict[str, Any] | None]] = []
        self.fail = fail
        self.status = status

    async def __call__(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        self.calls.append((command, arguments))
        if command == self.fail:
            raise MonitorError(f"QEMU refused {command}")
        if command == "query-block-jobs":
            return []
        if command == "query-status":
            return {"status": self.status}
        if command == "query-block":
            return [block("disk0", "/nonexistent/disk0.qcow2")]
        return {}

    def commands(self) -> list[str]:
        return [c for c, _ in self.calls if not c.startswith("query-")]


@pytest.mark.skipif(shutil.which("qemu-img") is None, reason="needs qemu-img")
async def test_a_refused_switch_leaves_no_node_and_no_file(tmp_path: Path) -> None:
    active = tmp_path / "disk0.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(active), "1M"], check=True)
    overlay = tmp_path / "disk0.s1.qcow2"
    mon = Monitor(fail="transaction")

    async def execute(command: str, arguments: dict[str, Any] | None = None) -> Any:
        if command == "query-block":
            return [block("disk0", str(active))]
        return await mon(command, arguments)

    with pytest.raises(MonitorError):
        await snap.take(execute, "vm", "s1", [("disk0", str(active), str(overlay))], tmp_path / "s1.vmstate", no_fd)
    assert mon.commands() == ["stop", "blockdev-add", "transaction", "blockdev-del", "cont"]
    deleted = [a for c, a in mon.calls if c == "blockdev-del"]
    added = [a for c, a in mon.calls if c == "blockdev-add"]
    assert added and deleted == [{"node-name": added[0]["node-name"]}]  # type: ignore[index]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["disk0.qcow2"]


async def test_refusals_before_anything_happens(tmp_path: Path) -> None:
    paused = Monitor(status="paused")
    with pytest.raises(WrongState, match="resume it first"):
        await snap.take(paused, "vm", "s1", [("disk0", "/d/disk0.qcow2", str(tmp_path / "o"))], tmp_path / "m")
    wrong = Monitor()
    with pytest.raises(HypervisorError, match=r"not /d/other\.qcow2"):
        await snap.take(wrong, "vm", "s1", [("disk0", "/d/other.qcow2", str(tmp_path / "o"))], None)

    async def busy(command: str, arguments: dict[str, Any] | None = None) -> Any:
        return [{"device": "repl-disk0"}] if command == "query-block-jobs" else {}

    with pytest.raises(Conflict, match="repl-disk0"):
        await snap.take(busy, "vm", "s1", [("disk0", "/d/disk0.qcow2", str(tmp_path / "o"))], None)
    assert paused.commands() == wrong.commands() == [] and list(tmp_path.iterdir()) == []
