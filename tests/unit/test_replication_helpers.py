"""Pure parts of kasou.hypervisor.qemu.replication: job states, the stall watch, the daemon's command line."""

from __future__ import annotations

import ipaddress
import socket
from pathlib import Path
from typing import Any

import pytest

from kasou.errors import InvalidSpec
from kasou.hypervisor.base import validate_disk_id
from kasou.hypervisor.qemu import nbdsocket
from kasou.hypervisor.qemu import replication as repl


def job(**kw: Any) -> dict[str, Any]:
    base = {"device": "repl-disk0", "type": "mirror", "status": "running", "ready": False, "io-status": "ok"}
    base.update({"len": 100, "offset": 0})
    base.update(kw)
    return base


def rec(**kw: Any) -> repl.Attached:
    return repl.Attached(
        **{"disk_id": "disk0", "nbd_host": "10.0.0.2", "nbd_port": 10809, "export": "e", "since": 1.0, **kw}
    )


def test_states() -> None:
    r = rec()
    assert repl.disk_status("disk0", None, None).state == "none"
    st = repl.disk_status("disk0", r, job(offset=25))
    assert (st.state, st.progress, st.nbd_host, st.nbd_port, st.export) == ("syncing", 0.25, "10.0.0.2", 10809, "e")
    st = repl.disk_status("disk0", r, job(status="ready", ready=True, offset=100))
    assert (st.state, st.progress, st.error) == ("in_sync", 1.0, None)
    for j, why in (
        (None, "ended"),
        (job(status="concluded", error="Input/output error"), "Input/output error"),
        (job(status="concluded"), "ended"),
        (job(status="ready", ready=True, **{"io-status": "failed"}), "failed"),
        (job(status="standby", ready=True), "paused"),
    ):
        st = repl.disk_status("disk0", r, j)
        assert st.state == "degraded" and st.error is not None and why in st.error, (j, st)
    # The guard's reason wins over a healthy-looking job (it cut the connection).
    st = repl.disk_status("disk0", rec(error="cut"), job(status="ready", ready=True))
    assert (st.state, st.error) == ("degraded", "cut")


def test_statuses_cover_every_disk() -> None:
    jobs = [job(status="ready", ready=True), job(device="repl-x")]
    out = repl.statuses(["disk0", "disk1"], {"disk0": rec(), "old": rec(disk_id="old")}, jobs)
    assert [(s.disk_id, s.state) for s in out] == [("disk0", "in_sync"), ("disk1", "none"), ("old", "degraded")]


def test_stall_watch() -> None:
    w = repl.StallWatch(stall_s=5)
    idle = job(status="ready", ready=True, len=100, offset=100)
    busy = job(status="ready", ready=True, len=104, offset=100)
    assert not w.stalled("vm", "disk0", idle, 0)
    assert not w.stalled("vm", "disk0", busy, 1)  # a write in flight: watched from now
    assert not w.stalled("vm", "disk0", busy, 5.9)
    assert w.stalled("vm", "disk0", busy, 6.0)  # no byte moved for 5 s
    moved = job(status="ready", ready=True, len=108, offset=104)
    assert not w.stalled("vm", "disk0", moved, 7)  # progress resets the clock
    assert not w.stalled("vm", "disk0", moved, 11.9)
    assert w.stalled("vm", "disk0", moved, 12)
    assert not w.stalled("vm", "disk0", job(status="concluded", error="x", len=108, offset=104), 20)  # ended
    w.stalled("vm", "disk0", busy, 30)
    w.forget("vm")
    assert not w.stalled("vm", "disk0", busy, 100)


def test_records_round_trip(tmp_path: Path) -> None:
    assert repl.load(tmp_path) == {}
    repl.save(tmp_path, {"disk0": rec()})
    assert repl.load(tmp_path) == {"disk0": rec()}
    repl.save(tmp_path, {})
    assert not (tmp_path / repl.RECORD).exists()
    (tmp_path / repl.RECORD).write_text("{not json")
    assert repl.load(tmp_path) == {}


def test_daemon_command_line(tmp_path: Path) -> None:
    path = tmp_path / "a,b" / "disk0.replica.qcow2"
    argv = repl.qsd_argv("qemu-storage-daemon", path, "kasou-vm-disk0-1", "10.0.0.2", 4242, False, tmp_path / "p")
    joined = " ".join(argv)
    assert f"filename={tmp_path}/a,,b/disk0.replica.qcow2,locking=on" in joined  # commas escaped, image locked
    assert "addr.host=10.0.0.2,addr.port=4242,max-connections=1" in joined  # one writer at a time
    assert "name=kasou-vm-disk0-1,writable=on,writethrough=off" in joined
    assert argv[-1] == "--daemonize" and "--pidfile" in argv
    assert "writethrough=on" in " ".join(repl.qsd_argv("q", path, "e", "h", 1, True, tmp_path / "p"))


def test_names() -> None:
    assert repl.job_id("disk0") == "repl-disk0" and repl.nbd_node("disk0") == "repl-nbd-disk0"
    assert len(repl.nbd_node("d" * 22)) <= 31  # QEMU's limit for node names
    for bad in ("", "0disk", "a.b", "../x", "d" * 23, "a b"):
        with pytest.raises(InvalidSpec):
            validate_disk_id(bad)


def test_proc_net_addresses() -> None:
    assert nbdsocket.proc_addr("0100007F") == ipaddress.ip_address("127.0.0.1")
    # ::ffff:10.0.0.2 as /proc/net/tcp6 writes it (four little-endian words)
    assert nbdsocket.proc_addr("0000000000000000FFFF00000200000A") == ipaddress.ip_address("10.0.0.2")
    assert nbdsocket.proc_addr("00000000000000000000000001000000") == ipaddress.ip_address("::1")


def test_socket_fds_finds_our_own_connection() -> None:
    import os

    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen()
        port = srv.getsockname()[1]
        with socket.create_connection(("127.0.0.1", port)) as c:
            fds = nbdsocket.socket_fds(os.getpid(), "127.0.0.1", port)
            assert fds == [c.fileno()]
            assert nbdsocket.socket_fds(os.getpid(), "127.0.0.2", port) == []
            assert nbdsocket.set_user_timeout(os.getpid(), "127.0.0.1", port, 1234) == 1
            assert c.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == 1234
            peer, _ = srv.accept()
            with peer:
                assert nbdsocket.cut_connections(os.getpid(), "127.0.0.1", port) == 1
                assert peer.recv(10) == b""  # the other end sees the connection end
