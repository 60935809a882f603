"""The pure parts of live migration: status parsing, names, URIs, saved state, the command line."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from kasou.errors import InvalidSpec
from kasou.hypervisor.base import IncomingInfo, LaunchDisk, LaunchSpec, MigrateRequest
from kasou.hypervisor.qemu import migration as mig
from kasou.hypervisor.qemu.cmdline import RuntimeFiles, build_argv

# query-migrate as QEMU 7.2 answered it on this machine (TCG, 128 MiB guest, 127.0.0.1).
COMPLETED: dict[str, Any] = {
    "status": "completed",
    "setup-time": 1,
    "downtime": 11,
    "total-time": 271,
    "ram": {
        "total": 151592960,
        "remaining": 0,
        "transferred": 95709621,
        "duplicate": 14143,
        "normal": 23290,
        "normal-bytes": 95395840,
        "dirty-sync-count": 3,
        "mbps": 2841.0,
        "page-size": 4096,
    },
}
ACTIVE: dict[str, Any] = {
    "status": "active",
    "setup-time": 2,
    "total-time": 1500,
    "expected-downtime": 300,
    "ram": {"total": 100 * 1024 * 1024, "remaining": 25 * 1024 * 1024, "transferred": 80 * 1024 * 1024},
}
FAILED: dict[str, Any] = {"status": "failed", "error-desc": "Unable to write to socket: Broken pipe"}


def job(disk: str, offset: int, length: int, **kw: Any) -> dict[str, Any]:
    base = {
        "device": mig.mirror_job(disk),
        "type": "mirror",
        "offset": offset,
        "len": length,
        "ready": offset == length,
        "status": "ready" if offset == length else "running",
        "io-status": "ok",
        "busy": False,
        "paused": False,
        "speed": 0,
    }
    base.update(kw)
    return base


def test_terminal_and_active() -> None:
    for s in ("completed", "failed", "cancelled"):
        assert mig.is_terminal(s) and not mig.is_active(s)
    for s in ("setup", "active", "device", "pre-switchover", "cancelling", "postcopy-active", "wait-unplug"):
        assert mig.is_active(s) and not mig.is_terminal(s)
    assert not mig.is_active("none") and not mig.is_terminal("none")


def test_completed_status() -> None:
    st = mig.status_from(COMPLETED, phase="migrating")
    assert st.status == "completed"
    assert st.progress == 1.0
    assert (st.downtime_ms, st.total_ms, st.setup_ms, st.error) == (11, 271, 1, None)


def test_active_status_progress_is_ram_transferred_over_total() -> None:
    st = mig.status_from(ACTIVE, phase="migrating", ram_bytes=128 * 1024 * 1024)
    assert st.status == "active"
    assert st.progress == 0.75  # QEMU's own total wins over the configured memory
    assert st.downtime_ms is None  # only once it happened
    assert st.total_ms == 1500


def test_failed_status_carries_qemus_reason() -> None:
    st = mig.status_from(FAILED)
    assert st.status == "failed" and st.error == "Unable to write to socket: Broken pipe"
    assert mig.status_from({}).status == "none"


def test_mirroring_weighs_disks_then_memory() -> None:
    jobs = [job("disk0", 30, 100), job("disk1", 50, 100)]
    st = mig.status_from(
        {"status": "none"},
        phase="mirroring",
        mirror_jobs=jobs,
        disk_ids=["disk0", "disk1"],
        ram_bytes=200,
        mirror_ms=1234,
    )
    assert st.status == "mirroring"
    assert st.progress == pytest.approx(80 / 400)
    assert st.total_ms == 1234 and st.setup_ms is None
    # Then memory: disks done, QEMU's memory counters take over; the disk copy time is added.
    done = [job("disk0", 100, 100), job("disk1", 100, 100)]
    ram = {"total": 200, "remaining": 100}
    st = mig.status_from(
        {"status": "active", "total-time": 10, "ram": ram},
        phase="migrating",
        mirror_jobs=done,
        disk_ids=["disk0", "disk1"],
        mirror_ms=1234,
    )
    assert st.progress == pytest.approx(300 / 400)
    assert st.total_ms == 1244
    # Another VM's job (or a backup) does not count.
    other = [*done, {"device": "backup-x", "offset": 0, "len": 10**9}]
    assert mig.mirror_progress(other, ["disk0", "disk1"]) == (200, 200)


def test_a_driver_failure_overrides_qemus_status() -> None:
    st = mig.status_from(COMPLETED, phase="failed", error="the copy of disk disk0 ended unexpectedly")
    assert st.status == "failed" and st.error == "the copy of disk disk0 ended unexpectedly"
    assert st.downtime_ms is None


def test_progress_is_clamped() -> None:
    weird = {"status": "active", "ram": {"total": 100, "remaining": 500}}
    assert mig.status_from(weird).progress == 0.0
    assert mig.status_from({"status": "active"}).progress == 0.0


def test_mirror_failure() -> None:
    ok = [job("disk0", 10, 10)]
    assert mig.mirror_failure(ok, ["disk0"]) is None
    assert mig.mirror_failure(ok, ["disk0", "disk1"]) == "the copy of disk disk1 ended unexpectedly"
    broken = [job("disk0", 5, 10, status="concluded", error="Input/output error")]
    assert "Input/output error" in (mig.mirror_failure(broken, ["disk0"]) or "")
    concluded = [job("disk0", 10, 10, status="concluded")]
    assert "ended before" in (mig.mirror_failure(concluded, ["disk0"]) or "")
    stopped = [job("disk0", 5, 10, **{"io-status": "failed"})]
    assert "I/O status failed" in (mig.mirror_failure(stopped, ["disk0"]) or "")


def test_names_and_uris() -> None:
    assert mig.nbd_node("disk0") == "mig-disk0"
    assert mig.mirror_job("disk0") == "mirror-disk0"
    assert mig.export_id("disk0") == "exp-disk0"
    assert mig.tcp_uri("10.0.0.2", 4444) == "tcp:10.0.0.2:4444"
    assert mig.tcp_uri("::1", 4444) == "tcp:[::1]:4444"
    assert mig.tcp_uri("host-b.example", 4444) == "tcp:host-b.example:4444"


def test_free_port_is_free() -> None:
    port = mig.free_port("127.0.0.1")
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))  # nobody holds it
    with pytest.raises(InvalidSpec):
        mig.free_port("192.0.2.1")  # TEST-NET: not an address of this host


def test_saved_state_round_trips(tmp_path: Path) -> None:
    info = IncomingInfo(
        storage="copy", migration_uri="tcp:127.0.0.1:1", nbd_host="127.0.0.1", nbd_port=2, exports={"d": "d"}
    )
    path = tmp_path / "migration.json"
    out = mig.Outgoing(incoming=info, disks=["d"], was_running=False, ram_bytes=5, phase="mirroring")
    out.reported_completed = True
    mig.save(path, out)
    back = mig.load(path)
    assert isinstance(back, mig.Outgoing)
    assert back.to_json() == out.to_json() and back.task is None
    mig.save(path, mig.Incoming(info, ["/d/x.qcow2"]))
    inc = mig.load(path)
    assert isinstance(inc, mig.Incoming) and inc.created == ["/d/x.qcow2"] and inc.info == info
    mig.save(path, None)
    assert not path.exists() and mig.load(path) is None
    path.write_text("{not json")
    assert mig.load(path) is None


def test_incoming_info_validation() -> None:
    with pytest.raises(ValidationError):
        IncomingInfo(storage="copy", migration_uri="tcp:h:1")  # no NBD server
    with pytest.raises(ValidationError):
        IncomingInfo(storage="nfs", migration_uri="tcp:h:1")  # type: ignore[arg-type]
    with pytest.raises(ValidationError):
        MigrateRequest(incoming=IncomingInfo(migration_uri="tcp:h:1"), downtime_ms=0)
    with pytest.raises(ValidationError):
        LaunchDisk(id="d", path="/x", size_bytes=0)


def test_incoming_command_line() -> None:
    spec = LaunchSpec(
        name="emr1",
        uuid="00000000-0000-0000-0000-000000000001",
        vcpus=1,
        memory_mib=128,
        disks=[LaunchDisk(id="disk0", path="/d/emr1/disk0.qcow2", size_bytes=1 << 30)],
    )
    files = RuntimeFiles(dir=Path("/run/k/emr1"), serial_log=Path("/log/emr1.log"))
    normal = build_argv(spec, files, "tcg", None)
    incoming = build_argv(spec, files, "tcg", None, incoming="defer")
    # The very same machine, plus "wait for the state" and "do not run".
    assert incoming[: len(normal)] == normal
    assert incoming[len(normal) :] == ["-incoming", "defer", "-S"]
    paused = spec.model_copy(update={"paused": True})
    assert build_argv(paused, files, "tcg", None, incoming="defer").count("-S") == 1
    assert files.migration == Path("/run/k/emr1/migration.json")
