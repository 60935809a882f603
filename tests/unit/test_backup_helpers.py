"""Pure helpers of backups: schedules, retention, what to ask for, full or incremental, the block graph,
and the content digest's independence from allocation."""

from __future__ import annotations

import asyncio
import subprocess
import time
from datetime import datetime
from pathlib import Path

import pytest

from kasou.control.backup_records import (
    BackupDiskRecord,
    BackupRecord,
    check_keep,
    parse_daily,
    plan_sources,
    to_prune,
)
from kasou.control.records import VMRecord
from kasou.errors import InvalidSpec
from kasou.hypervisor import imagefiles
from kasou.hypervisor.backups import BackupDisk, bitmap_name
from kasou.hypervisor.qemu.backups import decide, file_child, format_node, held_by_job, names
from kasou.model.retention import Counts
from kasou.model.spec import DiskSpec
from kasou.model.timeofday import last_slot


def test_daily_and_keep_are_checked() -> None:
    assert parse_daily("02:30") == (2, 30) and parse_daily("23:59") == (23, 59)
    for bad in ("24:00", "2:30", "02:60", "noon", "02:30:00"):
        with pytest.raises(InvalidSpec):
            parse_daily(bad)
    assert check_keep(1) == 1
    for bad in (0, -1, 1001):
        with pytest.raises(InvalidSpec):
            check_keep(bad)
    with pytest.raises(InvalidSpec):
        bitmap_name("../x")


def test_last_slot_is_the_latest_time_of_day_not_after_now() -> None:
    now = datetime(2026, 3, 10, 14, 0).timestamp()
    assert datetime.fromtimestamp(last_slot("13:30", now)) == datetime(2026, 3, 10, 13, 30)
    assert datetime.fromtimestamp(last_slot("14:00", now)) == datetime(2026, 3, 10, 14, 0)
    assert datetime.fromtimestamp(last_slot("14:01", now)) == datetime(2026, 3, 9, 14, 1)


def test_retention_drops_the_oldest() -> None:
    recs = [_record("h1", g).model_copy(update={"created_at": 1000.0 + g}) for g in (3, 1, 2, 4)]
    assert to_prune(recs, Counts(keep_last=2), 2000.0) == [1, 2]
    assert to_prune(recs[:2], Counts(keep_last=2), 2000.0) == [] and to_prune([], Counts(keep_last=3), 0.0) == []


def _record(host: str, gen: int = 1) -> BackupRecord:
    disk = BackupDiskRecord(disk_id="disk0", path=f"/b/g{gen}.qcow2", backing=None, kind="full", size_bytes=1,
                            file_bytes=1, bytes_copied=1, digest="d")  # fmt: skip
    return BackupRecord(vm="emr", generation=gen, id="abcd1234", host=host, kind="full", created_at=time.time(),
                        duration_s=1, running=True, bitmap=bitmap_name("abcd1234"), disks=[disk], vcpus=1,
                        memory_mib=128, image="tiny", nics=[])  # fmt: skip


def test_plan_sources_asks_for_an_incremental_only_when_it_can_be_one() -> None:
    vm = VMRecord(name="emr", uuid="u", vcpus=1, memory_mib=128, host="h1",
                  disks=[DiskSpec(id="disk0", size_bytes=1, format="qcow2", path="/d/disk0.qcow2")])  # fmt: skip
    srcs, why = plan_sources(vm, None, incremental=True)
    assert srcs[0].backing is None and "no earlier generation" in why
    srcs, why = plan_sources(vm, _record("h1"), incremental=True)
    assert (srcs[0].backing, srcs[0].base_bitmap, why) == ("/b/g1.qcow2", bitmap_name("abcd1234"), "")
    srcs, why = plan_sources(vm, _record("h2"), incremental=True)
    assert srcs[0].backing is None and "host h2" in why
    srcs, why = plan_sources(vm, _record("h1"), incremental=False)
    assert srcs[0].backing is None and why == ""


def test_decide_full_or_incremental() -> None:
    d = BackupDisk(disk_id="disk0", target="/t", backing="/b", base_bitmap="kasou-bk-a", new_bitmap="kasou-bk-b")
    ok = {"kasou-bk-a": {"recording": True}}
    assert decide(d, "qcow2", ok, busy=False) == ("incremental", "")
    assert decide(d, "qcow2", {}, busy=False)[1].endswith(
        "its dirty bitmap is missing (a new or replaced disk, a migration, or a snapshot since)"
    )
    assert "inconsistent" in decide(d, "qcow2", {"kasou-bk-a": {"recording": True, "inconsistent": True}}, False)[1]
    assert "stopped recording" in decide(d, "qcow2", {"kasou-bk-a": {"recording": False}}, False)[1]
    assert "raw" in decide(d, "raw", ok, False)[1]
    assert decide(d, "qcow2", ok, busy=True)[0] == "file"
    assert decide(d.model_copy(update={"backing": None}), "qcow2", ok, False) == ("full", "")
    assert all(len(n) <= 31 for n in names("abcdef12", "d" * 22))


def test_block_graph_helpers() -> None:
    graph = {
        "nodes": [
            {"id": 1, "name": "/machine/peripheral/disk0-dev/virtio-backend", "type": "block-backend"},
            {"id": 2, "name": "#block189", "type": "block-driver"},
            {"id": 6, "name": "disk0", "type": "block-driver"},
            {"id": 7, "name": "disk0-file", "type": "block-driver"},
            {"id": 5, "name": "mj", "type": "block-job"},
        ],
        "edges": [
            {"parent": 1, "child": 2, "name": "root"},
            {"parent": 2, "child": 6, "name": "backing"},
            {"parent": 6, "child": 7, "name": "file"},
            {"parent": 5, "child": 6, "name": "source"},
        ],
    }
    named = {"#block189": {"drv": "mirror_top"}, "disk0": {"drv": "qcow2"}, "disk0-file": {"drv": "file"}}
    assert format_node(graph, named, "#block189") == "disk0"
    assert held_by_job(graph, "disk0") and not held_by_job(graph, "disk0-file")
    assert file_child(graph, "disk0") == "disk0-file"


def test_content_digest_ignores_allocation(tmp_path: Path) -> None:
    a, b = tmp_path / "a.qcow2", tmp_path / "b.qcow2"
    for p in (a, b):
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(p), "4M"], check=True)
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x7 1M 64k", str(a)], check=True, capture_output=True)
    # b: the same data, plus explicitly written zeros (allocated, but the guest sees the same)
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x7 1M 64k", "-c", "write -P 0 2M 128k", str(b)],
                   check=True, capture_output=True)  # fmt: skip
    da = asyncio.run(imagefiles.digest(a, tmp_path / "s"))
    db = asyncio.run(imagefiles.digest(b, tmp_path / "s"))
    assert da == db and da.startswith(imagefiles.DIGEST_PREFIX)
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x8 1M 512", str(b)], check=True, capture_output=True)
    assert asyncio.run(imagefiles.digest(b, tmp_path / "s")) != da
    assert list((tmp_path / "s").iterdir()) == []  # no scratch file left


def test_a_slot_is_due_once_and_never_from_before_the_schedule() -> None:
    from kasou.model.timeofday import due_slot

    now = datetime(2026, 3, 10, 14, 0).timestamp()
    slot = datetime(2026, 3, 10, 13, 30).timestamp()
    assert due_slot("13:30", now, since=slot - 60, last=None) == slot
    assert due_slot("13:30", now, since=slot + 60, last=None) is None  # set after the slot: not on first sight
    assert due_slot("13:30", now, since=0.0, last=slot) is None  # handled already
