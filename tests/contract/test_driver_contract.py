"""The driver contract (kasou.hypervisor.base.Driver), one test body for the fake and for QEMU.

What the agent and the control plane rely on of a driver: states and pids, what each operation
does to them, which error each refusal raises, what is idempotent, and that a failure leaves
nothing. Each test runs against both drivers (``rig``: ``fake`` and ``qemu``); the real driver is
the truth, so where they differ the fake is made to behave like QEMU. Tests that share ``guest``
(one booted tiny guest per driver, to keep the QEMU run short) leave it running as they found it.

Run the QEMU half under the machine's QEMU lock:
``flock /tmp/kasou-qemu.lock timeout 900 pytest tests/contract -m qemu``.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
from pathlib import Path

import pytest

from kasou.errors import Conflict, InvalidSpec, KasouError, NotFound, QemuStartError, WrongState
from kasou.hypervisor.backups import BackupDisk, bitmap_name
from kasou.hypervisor.base import IncomingInfo, RuntimeInfo, RuntimeState
from kasou.hypervisor.snapshots import SnapshotDiskNow, SnapshotMerge, SnapshotMergeDisk, SnapshotTake
from tests.contract.conftest import Guest, Rig, qcow2_like
from tests.integration.qemu_rig import swtpm_pids

pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.timeout(180)]

DONE = (RuntimeState.EXITED, RuntimeState.CRASHED)


async def info_of(rig: Rig, name: str) -> RuntimeInfo:
    info = await rig.driver.info(name)
    assert info is not None, f"{rig.kind}: the driver forgot VM {name!r}"
    return info


async def state_of(rig: Rig, name: str) -> RuntimeState:
    return (await info_of(rig, name)).state


async def banner(path: Path) -> bytes:
    """The first bytes a VNC server at unix socket ``path`` sends."""
    reader, writer = await asyncio.wait_for(asyncio.open_unix_connection(str(path)), 5)
    try:
        return await asyncio.wait_for(reader.readexactly(12), 5)
    finally:
        writer.close()


def backing_of(path: Path | str) -> str | None:
    r = subprocess.run(["qemu-img", "info", "-U", "--output=json", str(path)], capture_output=True, timeout=30)
    data = json.loads(r.stdout)
    b = data.get("full-backing-filename") or data.get("backing-filename")
    return str(b) if b else None


# -- a VM this host knows nothing of ------------------------------------------------------------


async def test_unknown_vm_is_not_found_and_harmless_calls_do_nothing(rig: Rig) -> None:
    d, name = rig.driver, "c-nobody"
    assert await d.info(name) is None
    assert name not in [i.name for i in await d.list()]
    assert await d.vnc_socket(name) is None
    assert await d.serial_socket(name) is None
    assert name not in [s.name for s in await d.stats()]
    for op in (d.pause, d.resume, d.reset, d.powerdown, d.stop, d.console_log, d.migration_status, d.abort_out,
               d.finish_incoming, d.replica_status, d.mirror_status):  # fmt: skip
        with pytest.raises(NotFound):
            await op(name)
    with pytest.raises(NotFound):
        await d.snapshot(name, SnapshotTake(snapshot="s", disks=[SnapshotDiskNow(id="disk0", path="/nonexistent")]))
    with pytest.raises(NotFound):
        await d.attach_mirror(name, "disk0", "/nonexistent")
    with pytest.raises(NotFound):
        await d.backup_disks(name, "b1", [BackupDisk(disk_id="disk0", target="/x", new_bitmap=bitmap_name("b001"))])
    with pytest.raises(NotFound):
        await d.migrate_out(name, IncomingInfo(migration_uri="tcp:127.0.0.1:1"))
    with pytest.raises(NotFound):
        await d.change_medium(name, None)
    # Idempotent cleanups: nothing there, nothing to do.
    await d.forget(name)
    await d.finish_out(name)
    await d.abort_incoming(name)
    await d.detach_replica(name, "disk0")
    await d.detach_mirror(name, "disk0")
    assert await d.info(name) is None


async def test_a_failed_start_leaves_nothing(rig: Rig) -> None:
    spec = rig.spec("c-nodisk", disk=rig.root / "missing" / "disk0.qcow2")
    with pytest.raises(QemuStartError):
        await rig.driver.start(spec)
    assert await rig.driver.info(spec.name) is None
    assert spec.name not in [i.name for i in await rig.driver.list()]


async def test_a_start_without_its_firmware_state_leaves_nothing(rig: Rig) -> None:
    """A UEFI VM whose variable store is missing (its TPM started already), and a VM whose TPM state is
    missing, do not start; no process (QEMU or swtpm) is left."""
    home = rig.root / "disks" / "c-nofw"
    state = home / "tpm"
    state.mkdir(parents=True, exist_ok=True)
    for spec in (
        rig.spec("c-nofw", firmware="uefi", nvram=str(home / "missing.fd"), tpm_state=str(state)),
        rig.spec("c-nofw", tpm_state=str(home / "no-tpm")),
    ):
        with pytest.raises(QemuStartError):
            await rig.driver.start(spec)
        assert await rig.driver.info(spec.name) is None
        assert swtpm_pids(rig.root) == []


# -- the shared running guest -------------------------------------------------------------------


async def test_a_running_vm_reports_its_runtime(rig: Rig, guest: Guest) -> None:
    info = await info_of(rig, guest.name)
    assert info.name == guest.name and info.state == RuntimeState.RUNNING
    assert info.pid == guest.pid and info.pid > 0
    assert info.accelerator == rig.accelerator
    assert info.started_at is not None and time.time() - 600 < info.started_at <= time.time() + 1
    assert info.guest_ready and info.guest_uptime_s is not None and info.guest_uptime_s >= 0
    assert info.heartbeat_age_s is not None and info.heartbeat_age_s < 5
    assert info.exit_reason is None
    [listed] = [i for i in await rig.driver.list() if i.name == guest.name]
    assert (listed.state, listed.pid) == (info.state, info.pid)
    assert "KASOU-READY" in await rig.driver.console_log(guest.name)
    assert len((await rig.driver.console_log(guest.name, max_bytes=10)).encode()) <= 10


async def test_a_guest_without_an_agent(rig: Rig, guest: Guest) -> None:
    """The tiny guest runs no guest agent: it says so, and a guest-agent shutdown is refused, nothing changed."""
    info = await info_of(rig, guest.name)
    assert not info.guest.agent and info.guest.agent_age_s is None
    assert info.guest.hostname is None and info.guest.ips == []
    with pytest.raises(WrongState):
        await rig.driver.guest_shutdown(guest.name)
    with pytest.raises(WrongState, match="no guest agent answering"):
        await rig.driver.guest_exec(guest.name, ["/bin/true"], 5)
    assert await state_of(rig, guest.name) == RuntimeState.RUNNING


async def test_a_vm_without_a_cd_drive_refuses_a_disc(rig: Rig, guest: Guest) -> None:
    for iso in (None, "any-iso"):
        with pytest.raises(WrongState, match="no CD drive"):
            await rig.driver.change_medium(guest.name, iso)
    assert (await info_of(rig, guest.name)).state == RuntimeState.RUNNING


async def test_never_two_copies_of_a_vm(rig: Rig, guest: Guest) -> None:
    with pytest.raises(Conflict):
        await rig.driver.start(guest.spec)
    with pytest.raises(Conflict):
        await rig.driver.forget(guest.name)  # it still runs
    with pytest.raises(Conflict):
        await rig.driver.prepare_incoming(guest.spec, "shared", "127.0.0.1")
    # Attaching again finds nothing new and loses nothing.
    assert await rig.driver.attach_all() == []
    info = await info_of(rig, guest.name)
    assert (info.state, info.pid) == (RuntimeState.RUNNING, guest.pid)


async def test_display_and_stats_of_a_running_vm(rig: Rig, guest: Guest) -> None:
    sock = await rig.driver.vnc_socket(guest.name)
    assert sock is not None and sock.is_socket()
    assert (await banner(sock)).startswith(b"RFB ")
    serial = await rig.driver.serial_socket(guest.name)  # the serial console takes a terminal
    assert serial is not None and serial.is_socket()
    _, writer = await asyncio.wait_for(asyncio.open_unix_connection(str(serial)), 5)
    writer.close()
    [st] = [s for s in await rig.driver.stats() if s.name == guest.name]
    assert st.state == "running" and st.cpu_seconds >= 0 and st.rss_bytes > 0
    assert [x.id for x in st.disks] == ["disk0"] and st.nics == []


async def test_pause_resume_and_reset(rig: Rig, guest: Guest) -> None:
    d, name = rig.driver, guest.name
    await d.pause(name)
    assert await state_of(rig, name) == RuntimeState.PAUSED
    await d.pause(name)  # again: still paused
    assert await state_of(rig, name) == RuntimeState.PAUSED
    sock = await d.vnc_socket(name)  # a paused guest still has its display
    assert sock is not None and sock.is_socket()
    [st] = [s for s in await d.stats() if s.name == name]
    assert st.state == "paused"

    # A reset of a paused VM resets the machine; its vCPUs stay stopped.
    await d.reset(name)
    info = await info_of(rig, name)
    assert (info.state, info.pid) == (RuntimeState.PAUSED, guest.pid)

    await d.resume(name)
    assert await state_of(rig, name) == RuntimeState.RUNNING
    await d.resume(name)  # again: still running
    info = await info_of(rig, name)
    assert (info.state, info.pid) == (RuntimeState.RUNNING, guest.pid)

    # A reset of a running VM: same process, the guest boots again and becomes ready.
    await d.reset(name)
    assert (await info_of(rig, name)).pid == guest.pid

    async def ready_again() -> bool:
        now = await info_of(rig, name)
        assert (now.state, now.pid) == (RuntimeState.RUNNING, guest.pid), now
        return now.guest_ready

    await rig.until("the guest to be ready after its reset", ready_again, 90)


async def test_snapshot_and_merge_of_a_running_vm(rig: Rig, guest: Guest) -> None:
    d, name, disk = rig.driver, guest.name, guest.disk
    now = [SnapshotDiskNow(id="disk0", path=str(disk))]

    # A memory snapshot needs a running guest: refused while paused, nothing left.
    await d.pause(name)
    with pytest.raises(WrongState):
        await d.snapshot(name, SnapshotTake(snapshot="m1", disks=now, memory=True))
    assert sorted(p.name for p in disk.parent.iterdir()) == ["disk0.qcow2"]
    await d.resume(name)

    taken = await d.snapshot(name, SnapshotTake(snapshot="s1", disks=now))
    [layer] = taken.disks
    assert (taken.snapshot, taken.live, taken.memory_path) == ("s1", True, None)
    assert taken.consistency == "crash"  # the tiny guest has no guest agent to freeze its file systems
    assert (layer.id, layer.base) == ("disk0", str(disk))
    assert Path(layer.overlay).is_file() and backing_of(layer.overlay) == str(disk)
    assert await state_of(rig, name) == RuntimeState.RUNNING

    merged = await d.merge_snapshot(
        name, SnapshotMerge(disks=[SnapshotMergeDisk(id="disk0", top=layer.overlay, base=str(disk))])
    )
    assert merged.disks == {"disk0": str(disk)} and merged.live
    assert set(merged.base_bytes) == {"disk0"} and merged.base_bytes["disk0"] > 0
    assert await state_of(rig, name) == RuntimeState.RUNNING
    Path(layer.overlay).unlink(missing_ok=True)  # the agent removes a merged layer's file


async def test_mirror_a_disk_of_a_running_vm(rig: Rig, guest: Guest) -> None:
    d, name = rig.driver, guest.name
    target = qcow2_like(guest.disk, rig.root / "pool2" / name / "disk0.qcow2")
    assert [(m.disk_id, m.state) for m in await d.mirror_status(name)] == [("disk0", "none")]
    with pytest.raises(InvalidSpec):
        await d.attach_mirror(name, "disk0", str(target.with_name("missing.qcow2")))
    with pytest.raises(InvalidSpec):
        await d.attach_mirror(name, "disk9", str(target))
    assert [(m.disk_id, m.state) for m in await d.mirror_status(name)] == [("disk0", "none")]

    st = await d.attach_mirror(name, "disk0", str(target))
    assert st.disk_id == "disk0" and st.state in ("syncing", "in_sync") and st.second == str(target)

    async def in_sync() -> bool:
        [m] = await d.mirror_status(name)
        assert m.state in ("syncing", "in_sync"), m
        return m.state == "in_sync"

    await rig.until("the second copy to be in sync", in_sync, 60)
    [m] = await d.mirror_status(name)
    assert (m.path, m.second, m.error) == (str(guest.disk), str(target), None)
    again = await d.attach_mirror(name, "disk0", str(target))  # the same copy again: harmless
    assert again.second == str(target) and again.state == "in_sync"
    with pytest.raises(Conflict):
        await d.attach_mirror(name, "disk0", str(qcow2_like(guest.disk, rig.root / "pool3" / "disk0.qcow2")))

    await d.detach_mirror(name, "disk0")
    assert [(m.disk_id, m.state) for m in await d.mirror_status(name)] == [("disk0", "none")]
    await d.detach_mirror(name, "disk0")  # again: nothing to do
    assert await state_of(rig, name) == RuntimeState.RUNNING


async def test_replicate_a_disk_of_a_running_vm(rig: Rig, guest: Guest) -> None:
    d, name = rig.driver, guest.name
    exports = d.replica_exports()
    assert exports is not None
    replica = qcow2_like(guest.disk, rig.root / "replicas" / name / "disk0.qcow2")
    port = await exports.start(replica, "c-main-disk0", "127.0.0.1", True)
    try:
        assert exports.alive(replica)
        with pytest.raises(Conflict):
            await exports.start(replica, "c-main-disk0", "127.0.0.1", True)  # one daemon per file
        # Nobody serves that export: refused, nothing attached.
        with pytest.raises(KasouError):
            await d.attach_replica(name, "disk0", "127.0.0.1", port, "nobody", timeout_s=10)
        assert [(r.disk_id, r.state) for r in await d.replica_status(name)] == [("disk0", "none")]

        st = await d.attach_replica(name, "disk0", "127.0.0.1", port, "c-main-disk0", timeout_s=60)
        assert (st.disk_id, st.state, st.nbd_port, st.export) == ("disk0", "in_sync", port, "c-main-disk0")
        again = await d.attach_replica(name, "disk0", "127.0.0.1", port, "c-main-disk0", timeout_s=60)
        assert again.state == "in_sync"  # the same target again: harmless
        [r] = await d.replica_status(name)
        assert (r.disk_id, r.state) == ("disk0", "in_sync")

        await d.detach_replica(name, "disk0")
        assert [(r.disk_id, r.state) for r in await d.replica_status(name)] == [("disk0", "none")]
        await d.detach_replica(name, "disk0")  # again: nothing to do
    finally:
        await exports.stop(replica)
    assert not exports.alive(replica)
    await exports.stop(replica)  # again: nothing runs
    assert await state_of(rig, name) == RuntimeState.RUNNING


async def test_backup_of_a_running_vm(rig: Rig, guest: Guest) -> None:
    d, name = rig.driver, guest.name
    bdir = rig.root / "backups" / name
    bdir.mkdir(parents=True)
    first = BackupDisk(disk_id="disk0", target=str(bdir / "g1.qcow2"), new_bitmap=bitmap_name("g0001"))
    [r1] = await d.backup_disks(name, "g0001", [first])
    assert (r1.disk_id, r1.kind, r1.target, r1.bitmap) == ("disk0", "full", first.target, first.new_bitmap)
    assert Path(r1.target).is_file() and r1.bytes_copied >= 0 and r1.backing is None
    assert r1.consistency == "crash"  # no guest agent answers in the tiny guest

    second = BackupDisk(disk_id="disk0", target=str(bdir / "g2.qcow2"), backing=first.target,
                        base_bitmap=first.new_bitmap, new_bitmap=bitmap_name("g0002"))  # fmt: skip
    [r2] = await d.backup_disks(name, "g0002", [second])
    assert (r2.kind, r2.backing, r2.bitmap) == ("incremental", first.target, second.new_bitmap)
    assert Path(r2.target).is_file()
    assert await state_of(rig, name) == RuntimeState.RUNNING


# -- VMs of their own: start paused, shut down, crash, stop, forget -------------------------------


async def test_a_vm_started_paused(rig: Rig) -> None:
    d, spec = rig.driver, rig.spec("c-paused", paused=True)
    info = await d.start(spec)
    try:
        assert info.state == RuntimeState.PAUSED and info.pid is not None
        now = await info_of(rig, spec.name)
        assert now.state == RuntimeState.PAUSED and not now.guest_ready  # its guest has not run a single instruction
        await d.resume(spec.name)
        assert await state_of(rig, spec.name) == RuntimeState.RUNNING
    finally:
        await d.stop(spec.name)
        await d.forget(spec.name)
    assert await d.info(spec.name) is None


async def test_shutdown_restart_crash_stop_and_forget(rig: Rig) -> None:
    d, spec = rig.driver, rig.spec("c-life")
    name = spec.name
    first = await d.start(spec)

    async def ready() -> bool:
        return (await info_of(rig, name)).guest_ready

    await rig.until("the guest to be ready", ready, 90)

    # ACPI power button: the guest shuts itself down, its process ends.
    await d.powerdown(name)
    assert await state_of(rig, name) in (RuntimeState.SHUTTING_DOWN, RuntimeState.EXITED)

    async def exited() -> RuntimeInfo | None:
        now = await info_of(rig, name)
        return now if now.state == RuntimeState.EXITED else None

    gone = await rig.until("the guest to power off", exited, 60)
    assert (gone.pid, gone.exit_reason, gone.guest_ready) == (None, "guest-shutdown", False)
    assert await d.vnc_socket(name) is None
    assert name not in [s.name for s in await d.stats()]
    for op in (d.pause, d.resume, d.reset, d.powerdown):
        with pytest.raises(NotFound):
            await op(name)
    await d.stop(name)  # stopping what has ended: nothing to do
    assert await state_of(rig, name) == RuntimeState.EXITED
    assert isinstance(await d.console_log(name), str)  # its console output stays until forgotten

    # It starts again under its name (no forget needed), in a new process.
    again = await d.start(spec)
    assert again.state == RuntimeState.RUNNING and again.pid is not None and again.exit_reason is None
    assert again.pid != first.pid

    # Its process dies by itself: crashed, with a reason.
    await rig.crash(name)

    async def crashed() -> RuntimeInfo | None:
        now = await info_of(rig, name)
        return now if now.state == RuntimeState.CRASHED else None

    dead = await rig.until("the crash to be seen", crashed, 30)
    assert dead.pid is None and dead.exit_reason and not dead.guest_ready
    with pytest.raises(NotFound):
        await d.pause(name)

    # Start, stop: ended on request.
    await d.start(spec)
    await d.stop(name)
    stopped = await info_of(rig, name)
    assert (stopped.state, stopped.pid, stopped.exit_reason) == (RuntimeState.EXITED, None, "stopped")
    assert await d.vnc_socket(name) is None
    [listed] = [i for i in await d.list() if i.name == name]
    assert listed.state == RuntimeState.EXITED

    await d.forget(name)
    assert await d.info(name) is None and name not in [i.name for i in await d.list()]
    await d.forget(name)  # again: nothing to do
    with pytest.raises(NotFound):
        await d.stop(name)


# -- live migration between two hosts of the same kind ---------------------------------------------


async def test_live_migration_on_shared_storage(rig: Rig) -> None:
    src, dst = rig.driver, await rig.peer()
    spec = rig.spec("c-mig")
    await src.start(spec)
    name = spec.name
    try:
        # A destination that is abandoned: aborting it leaves nothing there.
        inc = await dst.prepare_incoming(spec, "shared", "127.0.0.1")
        assert (await dst.info(name)) is not None
        await dst.abort_incoming(name)
        assert await dst.info(name) is None

        inc = await dst.prepare_incoming(spec, "shared", "127.0.0.1")
        assert inc.storage == "shared" and inc.migration_uri.startswith("tcp:127.0.0.1:")
        waiting = await dst.info(name)
        assert waiting is not None and waiting.state == RuntimeState.INCOMING and waiting.pid is not None
        assert not waiting.guest_ready
        with pytest.raises(Conflict):
            await dst.start(spec)  # never two copies, also while one waits
        with pytest.raises(WrongState):
            await dst.pause(name)  # it does not run here yet
        with pytest.raises(NotFound):
            await dst.finish_incoming(name + "x")
        assert (await src.migration_status(name)).status == "none"

        await src.migrate_out(name, inc)
        with pytest.raises(WrongState):
            await src.pause(name)  # migrating: finish or abort first
        with pytest.raises(WrongState):
            await src.migrate_out(name, inc)

        seen: list[str] = []

        async def completed() -> bool:
            st = await src.migration_status(name)
            seen.append(st.status)
            assert st.status not in ("failed", "cancelled", "none"), st
            assert 0.0 <= st.progress <= 1.0
            return st.status == "completed"

        await rig.until("the migration to complete", completed, 60)
        assert await state_of(rig, name) == RuntimeState.PAUSED  # the source is paused for good
        with pytest.raises(WrongState):
            await src.abort_out(name)  # the destination may run it: not without force

        arrived = await dst.finish_incoming(name)
        assert arrived.state == RuntimeState.RUNNING and arrived.pid == waiting.pid
        again = await dst.finish_incoming(name)  # finished already: the same answer
        assert again.state == RuntimeState.RUNNING
        with pytest.raises(WrongState):
            await dst.abort_incoming(name)  # it runs here now

        await src.finish_out(name)
        assert await src.info(name) is None
        await src.finish_out(name)  # again: nothing to do
    finally:
        for drv in (src, dst):
            left = await drv.info(name)
            if left is not None and left.state == RuntimeState.INCOMING:
                await drv.abort_incoming(name)
            elif left is not None:
                await drv.stop(name)
                await drv.forget(name)
