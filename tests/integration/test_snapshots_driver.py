"""Snapshots with real QEMU and the tiny guest's writer, through one host's agent (httpx ASGI transport).

Run under the machine's QEMU lock:
``flock /tmp/kasou-qemu.lock .venv/bin/pytest tests/integration/test_snapshots_driver.py``.
The test kills its QEMUs by pid and removes its files.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from kasou.agent.client import AgentClient
from kasou.errors import WrongState
from kasou.hypervisor.base import LaunchSpec, RuntimeState
from kasou.hypervisor.snapshots import SnapshotDiskNow, SnapshotMerge, SnapshotMergeDisk, SnapshotRevert, SnapshotTake
from tests.integration.qemu_rig import (
    AgentHost,
    end_processes,
    qcow2_copy,
    scratch,
    seqs,
    start_writing,
    tiny_disk,
    tiny_spec,
    wait_for,
)

pytestmark = [
    pytest.mark.qemu,
    pytest.mark.shares_machine,
    pytest.mark.timeout(300),
]  # beside the fast tests (scripts/test.sh): tiny guests, no timing

NAME = "repl1"


@dataclass
class One:
    root: Path
    host: AgentHost
    disk: Path

    @property
    def client(self) -> AgentClient:
        return self.host.client

    def spec(self, path: Path) -> LaunchSpec:
        return tiny_spec(NAME, "5eb1a5e0-0000-4000-8000-00000000005a", path)


@pytest.fixture
async def one(tiny_image: Path) -> AsyncIterator[One]:
    image_disk = tiny_disk(tiny_image)
    root = scratch("kasou-snap-")
    host = AgentHost.make(root / "a", "host-a", tiny_image, NAME)
    await host.driver.attach_all()
    disk = qcow2_copy(image_disk, host.disks / NAME / "disk0.qcow2")
    try:
        yield One(root, host, disk)
    finally:
        await host.close()
        await end_processes(root)
        shutil.rmtree(root, ignore_errors=True)


def backing(path: Path | str) -> str | None:
    r = subprocess.run(["qemu-img", "info", "-U", "--output=json", str(path)], capture_output=True, timeout=30)
    info = json.loads(r.stdout)
    b = info.get("full-backing-filename") or info.get("backing-filename")
    return str(b) if b else None


async def last_seq(o: One) -> int:
    return (o.host.seqs() or [0])[-1]


async def writes(o: One, more: int, timeout: float = 60) -> int:
    n = await last_seq(o)

    async def advanced() -> int | None:
        info = await o.client.info(NAME)
        assert info.state == RuntimeState.RUNNING, info
        last = await last_seq(o)
        return last if last >= n + more else None

    return await wait_for(f"{more} more seq lines", advanced, timeout)


async def boot(o: One, path: Path) -> None:
    await start_writing(o.host, o.spec(path), 3, "the guest to write")


async def stop(o: One) -> None:
    await o.client.action(NAME, "stop")
    await o.client.forget(NAME)


def recovered(text: str) -> int:
    return next(int(ln.split()[1]) for ln in text.splitlines() if ln.startswith("recovered "))


async def test_snapshot_write_revert_and_merge_while_running(one: One) -> None:
    o = one
    await boot(o, o.disk)
    take = SnapshotTake(snapshot="m1", disks=[SnapshotDiskNow(id="disk0", path=str(o.disk))], memory=True)

    # A paused guest cannot give a memory snapshot; nothing is left of the attempt.
    await o.client.action(NAME, "pause")
    with pytest.raises(WrongState):
        await o.client.take_snapshot(NAME, take)
    assert sorted(p.name for p in o.disk.parent.iterdir()) == ["disk0.qcow2"]
    await o.client.action(NAME, "resume")
    await writes(o, 3)

    # -- a memory snapshot of the running guest ------------------------------------------------
    before, up_before = await last_seq(o), (await o.client.info(NAME)).guest_uptime_s
    t0 = time.monotonic()
    m1 = await o.client.take_snapshot(NAME, take)
    took = time.monotonic() - t0
    after = await last_seq(o)
    ov_m1 = o.disk.parent / "disk0.m1.qcow2"
    assert m1.live and m1.memory_path and m1.memory_bytes > 0 and m1.paused_ms is not None
    assert [(d.base, d.overlay) for d in m1.disks] == [(str(o.disk), str(ov_m1))]
    assert backing(ov_m1) == str(o.disk)
    print(
        f"\n[snapshot] memory snapshot: {took:.2f} s, guest paused {m1.paused_ms} ms, "
        f"state {m1.memory_bytes / 2**20:.1f} MiB"
    )
    await writes(o, 60)  # ~6 s of writes the revert must undo
    assert up_before is not None

    # -- revert: the guest goes on from the saved instant, no reboot --------------------------
    t_snap = time.monotonic() - t0
    await stop(o)
    layers = SnapshotRevert(disks=m1.disks)
    await o.client.revert_snapshot(NAME, layers)
    t1 = time.monotonic()
    info = await o.client.restore(NAME, o.spec(ov_m1), m1.memory_path)
    print(f"[snapshot] restore from the memory state: {time.monotonic() - t1:.2f} s")
    assert info.state == RuntimeState.RUNNING
    await wait_for("the restored guest to write", lambda: _some(o, 3), 60)
    text = o.host.log()
    assert "recovered" not in text and "KASOU-READY" not in text, text[:500]
    first = seqs(text)[0]
    assert before < first <= after + 1, (before, first, after)
    assert seqs(text) == list(range(first, first + len(seqs(text))))
    hb = await wait_for("a heartbeat", lambda: _uptime(o), 30)
    # the guest's clock went on from the snapshot, not from the wall clock and not from zero
    assert up_before - 1 < hb < up_before + (t_snap - 2), (up_before, hb, t_snap)

    # -- a disk-only snapshot, more writes, revert: the guest boots on the disk of that moment --
    before = await last_seq(o)
    t_d1 = time.monotonic()
    d1 = await o.client.take_snapshot(
        NAME, SnapshotTake(snapshot="d1", disks=[SnapshotDiskNow(id="disk0", path=str(ov_m1))])
    )
    print(f"[snapshot] disk-only snapshot: {time.monotonic() - t_d1:.2f} s ({d1.consistency})")
    assert d1.consistency == "crash" and m1.consistency == "memory"  # the tiny guest has no guest agent
    after = await last_seq(o)
    ov_d1 = o.disk.parent / "disk0.d1.qcow2"
    assert d1.memory_path is None and backing(ov_d1) == str(ov_m1)
    await writes(o, 20)
    await stop(o)
    await o.client.revert_snapshot(NAME, SnapshotRevert(disks=d1.disks))
    await boot(o, ov_d1)
    n = recovered(o.host.log())
    assert before <= n <= after + 1, (before, n, after)  # acknowledged before the snapshot, nothing after

    # -- delete both while the guest writes: an intermediate and an active merge ---------------
    before = await last_seq(o)
    t2 = time.monotonic()
    merged = await o.client.merge_snapshot(
        NAME, SnapshotMerge(disks=[SnapshotMergeDisk(id="disk0", top=str(ov_m1), base=str(o.disk), child=str(ov_d1))])
    )
    assert merged.disks == {"disk0": str(ov_d1)} and not ov_m1.exists()
    assert backing(ov_d1) == str(o.disk)
    merged = await o.client.merge_snapshot(
        NAME, SnapshotMerge(disks=[SnapshotMergeDisk(id="disk0", top=str(ov_d1), base=str(o.disk))])
    )
    print(f"[snapshot] two merges while the guest writes: {time.monotonic() - t2:.2f} s")
    assert merged.disks == {"disk0": str(o.disk)} and not ov_d1.exists()
    last = await writes(o, 10)
    assert last > before
    log = seqs(o.host.log())
    assert log == list(range(log[0], log[0] + len(log)))  # no gap, no repeat: the guest never noticed
    launched = json.loads((o.host.root / "run" / NAME / "launch.json").read_text())
    assert launched["spec"]["disks"][0]["path"] == str(o.disk)

    # Stopped and booted again on the merged disk: every acknowledged write is there.
    final = await last_seq(o)
    await stop(o)
    Path(m1.memory_path).unlink()
    assert sorted(p.name for p in o.disk.parent.iterdir()) == ["disk0.qcow2"]
    assert subprocess.run(["qemu-img", "check", "-q", str(o.disk)], timeout=60).returncode == 0
    await boot(o, o.disk)
    assert recovered(o.host.log()) >= final


async def _some(o: One, n: int) -> bool:
    return len(o.host.seqs()) >= n


async def _uptime(o: One) -> float | None:
    info = await o.client.info(NAME)
    return info.guest_uptime_s if info.heartbeat_age_s is not None else None
