"""Live migration between two QemuDrivers (two "hosts" in one process) with the real tiny guest.

Run under the machine's QEMU lock: ``flock /tmp/kasou-qemu.lock .venv/bin/pytest
tests/integration/test_migration_driver.py``. Every test kills its QEMUs (by pid)
and removes its files. The measured numbers are printed (``-s``).
"""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from kasou.errors import WrongState
from kasou.hypervisor.base import LaunchSpec, MigrationStatus, RuntimeState
from kasou.hypervisor.qemu.driver import QemuDriver
from kasou.hypervisor.qemu.driver_core import HEARTBEAT_FRESH_S
from kasou.model.cloudinit import CloudInit
from tests.integration.conftest import pid_alive
from tests.integration.qemu_rig import (
    DISK_SIZE,
    console_log,
    end_processes,
    make_driver,
    pids_under,
    qcow2_copy,
    scratch,
    seqs,
    tiny_disk,
    tiny_spec,
    wait_for,
)

pytestmark = [pytest.mark.qemu, pytest.mark.timeout(600)]

NAME = "mig1"


@dataclass
class Pair:
    root: Path
    a: QemuDriver
    b: QemuDriver
    image_disk: Path

    def spec(self, disk: Path) -> LaunchSpec:
        """The tiny guest with a cloud-init seed (which it ignores): each end of a migration makes its own."""
        spec = tiny_spec(NAME, "5eb1a5e0-0000-4000-8000-000000000001", disk, size_bytes=DISK_SIZE)
        return spec.model_copy(update={"cloud_init": CloudInit(hostname=NAME)})

    def disk_from_image(self, path: Path) -> Path:
        return qcow2_copy(self.image_disk, path)

    def log(self, d: QemuDriver) -> str:
        return console_log(d.serial_log_dir, NAME)


@pytest.fixture
async def pair(tiny_image: Path) -> AsyncIterator[Pair]:
    image_disk = tiny_disk(tiny_image)
    root = scratch("kasou-mig-")
    a = make_driver(root / "a", tiny_image)
    b = make_driver(root / "b", tiny_image)
    await a.attach_all()
    await b.attach_all()
    pr = Pair(root, a, b, image_disk)
    try:
        yield pr
    finally:
        for d in {a, b, pr.a, pr.b}:
            await d.close()
        await end_processes(root, storage_daemons=False)
        shutil.rmtree(root, ignore_errors=True)


def guest_clock(info: Any) -> float | None:
    """The uptime the guest itself last said (its heartbeat line), not the driver's estimate since: under load a
    TCG guest's clock runs slower than the host's, so an estimate on A may be ahead of what the guest says on B."""
    if info is None or info.guest_uptime_s is None:
        return None
    age = float(info.heartbeat_age_s or 0.0)
    return float(info.guest_uptime_s) - (age if age < HEARTBEAT_FRESH_S else 0.0)


async def boot(p: Pair, disk: Path) -> float:
    """Start the VM on A and wait until it writes and beats; returns its guest uptime."""
    await p.a.start(p.spec(disk))

    async def ready() -> float | None:
        info = await p.a.info(NAME)
        assert info is not None and info.state == RuntimeState.RUNNING, info
        ok = info.guest_ready and info.guest_uptime_s and len(seqs(p.log(p.a))) >= 5
        return guest_clock(info) if ok else None

    return await wait_for("the guest on A to be ready", ready, 90)


async def until_completed(p: Pair, timeout: float = 120.0) -> tuple[MigrationStatus, list[str]]:
    seen: list[str] = []

    async def done() -> MigrationStatus | None:
        st = await p.a.migration_status(NAME)
        if not seen or seen[-1] != st.status:
            seen.append(st.status)
        assert st.status not in ("failed", "cancelled"), st
        assert 0.0 <= st.progress <= 1.0
        return st if st.status == "completed" else None

    return await wait_for("the migration to complete", done, timeout), seen


async def check_runs_on_b(p: Pair, pid_a: int, uptime_before: float) -> tuple[list[int], list[int]]:
    """B runs the guest, A's QEMU is gone, uptime never went back, the counter has no gap."""
    assert await p.a.info(NAME) is None  # finished and forgotten
    assert not pid_alive(pid_a)
    assert not (p.a.run_dir / NAME).exists()

    async def beating() -> Any:
        info = await p.b.info(NAME)
        assert info is not None and info.state == RuntimeState.RUNNING, info
        ok = info.guest_ready and info.guest_uptime_s is not None and len(seqs(p.log(p.b))) >= 5
        return info if ok else None

    info = await wait_for("the guest to beat and write on B", beating, 60)
    assert (guest_clock(info) or 0.0) >= uptime_before, (info, uptime_before)
    a_seqs, b_seqs = seqs(p.log(p.a)), seqs(p.log(p.b))
    # A line cut at the switch-over continues in B's log: read the two logs as one stream.
    both = seqs(p.log(p.a) + p.log(p.b))
    assert both == list(range(both[0], both[0] + len(both))), "the counter skipped or repeated"
    assert b_seqs[-1] > a_seqs[-1]
    return a_seqs, b_seqs


def report(mode: str, st: MigrationStatus, wall_s: float, statuses: list[str]) -> None:
    print(
        f"\n[migration {mode}] downtime {st.downtime_ms} ms, total {st.total_ms} ms "
        f"(setup {st.setup_ms} ms), wall {wall_s * 1000:.0f} ms, statuses seen {statuses}"
    )


def seq_file(disk: Path, work: Path) -> list[int]:
    """The guest's /data/seq.log as on ``disk`` (journal replayed on a raw copy)."""
    raw = work / f"{disk.stem}.raw"
    subprocess.run(["qemu-img", "convert", "-U", "-O", "raw", str(disk), str(raw)], check=True, timeout=60)
    r = subprocess.run(["e2fsck", "-fy", str(raw)], capture_output=True, text=True, timeout=60)
    assert r.returncode in (0, 1), r.stdout + r.stderr  # 1: the journal was replayed (fine)
    out = subprocess.run(
        ["debugfs", "-R", "cat /seq.log", str(raw)], capture_output=True, text=True, check=True, timeout=60
    ).stdout
    raw.unlink()
    return [int(x) for x in out.split()]


async def test_shared_storage(pair: Pair) -> None:
    p = pair
    disk = p.disk_from_image(p.root / "shared" / "disk0.qcow2")
    uptime_before = await boot(p, disk)
    pid_a = (await p.a.info(NAME)).pid  # type: ignore[union-attr]

    inc = await p.b.prepare_incoming(p.spec(disk), "shared", "127.0.0.1")
    assert inc.storage == "shared" and inc.nbd_port is None and inc.exports == {}
    assert inc.migration_uri.startswith("tcp:127.0.0.1:")
    info_b = await p.b.info(NAME)
    assert info_b is not None and info_b.state == RuntimeState.INCOMING and not info_b.guest_ready
    assert (p.b.run_dir / NAME / "seed.iso").is_file()  # B made the seed from the spec: nothing to copy

    t0 = time.monotonic()
    uptime_before = guest_clock(await p.a.info(NAME)) or uptime_before
    await p.a.migrate_out(NAME, inc, downtime_ms=100)
    st, seen = await until_completed(p)
    wall = time.monotonic() - t0
    assert st.progress == 1.0 and st.downtime_ms is not None and st.total_ms is not None
    # The switch-over happened, but nothing runs on B until it is told to.
    assert (await p.b.info(NAME)).state == RuntimeState.INCOMING  # type: ignore[union-attr]
    assert (await p.a.info(NAME)).state == RuntimeState.PAUSED  # type: ignore[union-attr]
    assert seqs(p.log(p.b)) == []

    info = await p.b.finish_incoming(NAME)
    assert info.state == RuntimeState.RUNNING
    await p.a.finish_out(NAME)
    await check_runs_on_b(p, pid_a, uptime_before)
    report("shared", st, wall, seen)


async def test_copy_storage(pair: Pair) -> None:
    p = pair
    disk_a = p.disk_from_image(p.root / "a" / "disks" / NAME / "disk0.qcow2")
    disk_b = p.root / "b" / "disks" / NAME / "disk0.qcow2"
    uptime_before = await boot(p, disk_a)
    pid_a = (await p.a.info(NAME)).pid  # type: ignore[union-attr]

    inc = await p.b.prepare_incoming(p.spec(disk_b), "copy", "127.0.0.1")
    assert inc.storage == "copy" and inc.nbd_host == "127.0.0.1" and inc.nbd_port
    assert inc.exports == {"disk0": "disk0"}
    assert disk_b.exists()

    t0 = time.monotonic()
    uptime_before = guest_clock(await p.a.info(NAME)) or uptime_before
    await p.a.migrate_out(NAME, inc, downtime_ms=100)
    first = await p.a.migration_status(NAME)
    assert first.status in ("mirroring", "setup", "active", "completed"), first
    st, seen = await until_completed(p)
    wall = time.monotonic() - t0
    assert st.downtime_ms is not None and st.total_ms is not None

    # At the switch-over both copies are paused and the destination's disk is exactly the source's.
    r = subprocess.run(
        ["qemu-img", "compare", "-U", str(disk_a), str(disk_b)], capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0, r.stdout + r.stderr

    await p.b.finish_incoming(NAME)
    await p.a.finish_out(NAME)
    await check_runs_on_b(p, pid_a, uptime_before)
    assert disk_a.exists()  # the source's disk is the control plane's to delete

    # Everything the guest acknowledged (on either host) is in the destination's file system.
    await p.b.pause(NAME)
    acked = seqs(p.log(p.b))[-1]
    await p.b.stop(NAME)
    written = seq_file(disk_b, p.root)
    assert written == list(range(1, len(written) + 1)), "the file has a gap or a repeat"
    assert written[-1] >= acked
    at_cut = seq_file(disk_a, p.root)
    assert written[: len(at_cut)] == at_cut and len(at_cut) >= 5
    report("copy", st, wall, seen)


async def test_abort_keeps_the_vm_on_the_source(pair: Pair) -> None:
    p = pair
    disk_a = p.disk_from_image(p.root / "a" / "disks" / NAME / "disk0.qcow2")
    disk_b = p.root / "b" / "disks" / NAME / "disk0.qcow2"
    await boot(p, disk_a)
    pid_a = (await p.a.info(NAME)).pid  # type: ignore[union-attr]

    async def still_on_a() -> None:
        info = await p.a.info(NAME)
        assert info is not None and info.state == RuntimeState.RUNNING and info.pid == pid_a, info
        assert (await p.a.migration_status(NAME)).status == "none"
        n = seqs(p.log(p.a))[-1]

        async def writes() -> bool:
            i = await p.a.info(NAME)
            assert i is not None
            fresh = i.guest_ready and i.heartbeat_age_s is not None and i.heartbeat_age_s < 3
            return fresh and seqs(p.log(p.a))[-1] >= n + 3

        await wait_for("the guest on A to go on writing", writes, 30)
        # Nothing of the VM is left on B.
        assert await p.b.info(NAME) is None
        assert not disk_b.exists() and not disk_b.parent.exists()
        assert not (p.b.run_dir / NAME).exists()
        assert pids_under(p.root / "b", storage_daemons=False) == []

    # 1. Abort while the disk is being copied (or, on a fast host, just after).
    inc = await p.b.prepare_incoming(p.spec(disk_b), "copy", "127.0.0.1")
    await p.a.migrate_out(NAME, inc, bandwidth_mib_s=1)
    st = await p.a.migration_status(NAME)
    assert st.status in ("mirroring", "setup", "active"), st
    await p.a.abort_out(NAME)
    await p.b.abort_incoming(NAME)
    await still_on_a()

    # 2. Abort while the memory goes, the disk copy in sync: at 4 MiB/s the 64 MiB disk takes
    # about 16 s (QEMU counts the zeroes too) and the memory about 25 s more.
    inc = await p.b.prepare_incoming(p.spec(disk_b), "copy", "127.0.0.1")
    await p.a.migrate_out(NAME, inc, bandwidth_mib_s=4)

    async def active() -> MigrationStatus | None:
        s = await p.a.migration_status(NAME)
        assert s.status in ("mirroring", "setup", "active"), s
        return s if s.status == "active" and s.progress > 0 else None

    st = await wait_for("the memory to be under way", active, 90)
    assert (await p.b.info(NAME)).state == RuntimeState.INCOMING  # type: ignore[union-attr]
    await p.a.abort_out(NAME)
    await p.b.abort_incoming(NAME)
    await still_on_a()

    # 3. Nothing of the aborted attempts is in the way of one that goes through.
    inc = await p.b.prepare_incoming(p.spec(disk_b), "copy", "127.0.0.1")
    await p.a.migrate_out(NAME, inc)
    await until_completed(p)
    await p.b.finish_incoming(NAME)
    await p.a.finish_out(NAME)
    assert not pid_alive(pid_a)
    info = await p.b.info(NAME)
    assert info is not None and info.state == RuntimeState.RUNNING


async def test_agents_restart_then_abort_after_the_switch_over(pair: Pair) -> None:
    """Both agents restart after the switch-over; the VM goes back to running on A, and only on A."""
    p = pair
    disk = p.disk_from_image(p.root / "shared" / "disk0.qcow2")
    await boot(p, disk)
    pid_a = (await p.a.info(NAME)).pid  # type: ignore[union-attr]
    inc = await p.b.prepare_incoming(p.spec(disk), "shared", "127.0.0.1")
    await p.a.migrate_out(NAME, inc)
    await until_completed(p)
    last_a = seqs(p.log(p.a))[-1]

    # The agents restart: the QEMUs stay, and the new drivers pick up the migration from their files.
    old_a, old_b = p.a, p.b
    await old_a.close()
    await old_b.close()
    p.a = QemuDriver(old_a.run_dir, old_a.serial_log_dir, old_a.images_dir, "tcg")
    p.b = QemuDriver(old_b.run_dir, old_b.serial_log_dir, old_b.images_dir, "tcg")
    assert await p.a.attach_all() == [NAME]
    assert await p.b.attach_all() == [NAME]
    assert (await p.b.info(NAME)).state == RuntimeState.INCOMING  # type: ignore[union-attr]
    assert (await p.a.info(NAME)).state == RuntimeState.PAUSED  # type: ignore[union-attr]
    assert (await p.a.migration_status(NAME)).status == "completed"

    # "completed" was said: B may run the guest, so A neither resumes nor aborts on its own.
    with pytest.raises(WrongState):
        await p.a.resume(NAME)
    with pytest.raises(WrongState):
        await p.a.abort_out(NAME)
    await p.b.abort_incoming(NAME)
    assert await p.b.info(NAME) is None and pids_under(p.root / "b", storage_daemons=False) == []
    await p.a.abort_out(NAME, force=True)

    async def writes() -> bool:
        i = await p.a.info(NAME)
        assert i is not None and i.state == RuntimeState.RUNNING and i.pid == pid_a, i
        return seqs(p.log(p.a))[-1] >= last_a + 3

    await wait_for("the guest on A to write again", writes, 30)
    both = seqs(p.log(p.a))
    assert both == list(range(both[0], both[0] + len(both)))
    assert (await p.a.migration_status(NAME)).status == "none"
