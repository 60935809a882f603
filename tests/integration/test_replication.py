"""Synchronous disk replication with real QEMU, qemu-storage-daemon and the tiny guest, through the agents.

Two "hosts" in one process, each a QemuDriver behind its own agent app (httpx
ASGI transport): A runs the VM, B keeps the replica. Run under the machine's
QEMU lock: ``flock /tmp/kasou-qemu.lock .venv/bin/pytest tests/integration/test_replication.py``.
Every test kills its QEMUs and daemons by pid and removes its files.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from kasou.errors import HypervisorError, InvalidSpec
from kasou.hypervisor.base import ReplicaStatus
from kasou.hypervisor.qemu import nbdsocket
from kasou.hypervisor.qemu import replication as repl
from tests.integration.conftest import pid_alive
from tests.integration.qemu_rig import (
    DISK_SIZE,
    AgentHost,
    TwoHosts,
    boot_on_a,
    need_storage_daemon,
    pids_under,
    scratch,
    serving,
    tiny_disk,
    wait_for,
    writes_go_on,
)

pytestmark = [pytest.mark.qemu, pytest.mark.timeout(300)]

NAME = "repl1"


class Pair(TwoHosts):
    async def restart_agent(self, which: str) -> AgentHost:
        """The agent of a host restarts: a new driver and app over the same files (QEMU and daemons stay)."""
        old: AgentHost = getattr(self, which)
        await old.close()
        new = AgentHost.make(old.root, old.name, old.driver.images_dir, old.vm)
        await new.driver.attach_all()
        setattr(self, which, new)
        return new


@pytest.fixture
async def pair(tiny_image: Path) -> AsyncIterator[Pair]:
    need_storage_daemon()
    image_disk = tiny_disk(tiny_image)
    root = scratch("kasou-repl-")
    a = AgentHost.make(root / "a", "host-a", tiny_image, NAME)
    b = AgentHost.make(root / "b", "host-b", tiny_image, NAME)
    p = Pair(root, a, b, image_disk, uuid="5eb1a5e0-0000-4000-8000-0000000000a1")
    async with serving(p):
        yield p


async def replicate(p: Pair) -> tuple[ReplicaStatus, Path]:
    t = await p.b.client.create_replica(NAME, "disk0", DISK_SIZE)
    t0 = time.monotonic()
    st = await p.a.client.attach_replica(NAME, t, timeout_s=60)
    print(f"\n[replication] in sync {time.monotonic() - t0:.2f} s after attach ({DISK_SIZE >> 20} MiB disk)")
    assert st.state == "in_sync" and st.progress == 1.0 and st.error is None, st
    return st, Path(t.path)


def nbd_greets(port: int, wait: float = 1.5) -> bool:
    """Whether the NBD server on ``port`` starts a handshake with a new client within ``wait`` s."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.settimeout(wait)
        try:
            return s.recv(8) == b"NBDMAGIC"
        except TimeoutError:
            return False


async def test_failover_to_the_replica(pair: Pair) -> None:
    """Kill the VM's QEMU: the replica, promoted, boots with every write the guest saw acknowledged."""
    p = pair
    await boot_on_a(p)

    # Attaching to a wrong export or a replica of another size fails and leaves nothing attached.
    t = await p.b.client.create_replica(NAME, "disk0", 2 * DISK_SIZE)
    with pytest.raises(HypervisorError):
        await p.a.client.attach_replica(NAME, t.model_copy(update={"export": "nobody"}))
    with pytest.raises(InvalidSpec):
        await p.a.client.attach_replica(NAME, t)
    assert [s.state for s in await p.a.client.replica_status(NAME)] == ["none"]
    await p.b.client.delete_replica(NAME)

    st, replica = await replicate(p)
    assert [s.state for s in await p.a.client.replica_status(NAME)] == ["in_sync"]
    assert st.nbd_port is not None

    # The kernel drops QEMU's NBD connection if the replica's host stops acknowledging (10 s).
    pid_a = (await p.a.client.info(NAME)).pid
    assert pid_a is not None
    [fd] = nbdsocket.socket_fds(pid_a, "127.0.0.1", st.nbd_port)
    with nbdsocket.borrow(pid_a, fd) as conn:
        assert conn.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == nbdsocket.TCP_USER_TIMEOUT_MS

    # The replica takes one writer, and its file is locked against any other process.
    assert not nbd_greets(st.nbd_port)
    r = subprocess.run(["qemu-img", "info", str(replica)], capture_output=True, text=True, timeout=30)
    assert r.returncode != 0 and "lock" in r.stderr, r.stderr

    await writes_go_on(p.a)
    os.kill(pid_a, signal.SIGKILL)  # the VM's host dies
    while pid_alive(pid_a):
        await asyncio.sleep(0.01)
    last = p.a.seqs()[-1]  # every "seq N" was printed after the guest's fsync returned

    promoted = await p.b.client.promote_replica(NAME)
    assert promoted.disks == {"disk0": str(replica)}
    assert not [r for r in await p.b.client.list_replicas() if r.daemon_alive]
    await p.b.client.start(p.spec(replica))

    async def recovered() -> int | None:
        for ln in p.b.log().splitlines():
            if ln.startswith("recovered "):
                return int(ln.split()[1])
        return None

    n = await wait_for("the guest on B to read its disk", recovered, 90)
    print(f"[replication] last write acknowledged on A: {last}; recovered on B: {n}")
    assert n >= last, f"the replica lost acknowledged writes: recovered {n} < {last}"
    await writes_go_on(p.b, 3)
    assert p.b.seqs()[0] == n + 1
    await p.b.client.action(NAME, "stop")
    assert (await p.b.client.delete_replica(NAME, keep_file=True)).kept == [str(replica)]


async def test_degraded_rebuild_and_a_hung_replica(pair: Pair) -> None:
    """The replica's daemon dies, then another hangs: the guest writes on; a rebuild brings it back in sync."""
    p = pair
    await boot_on_a(p)
    _, replica = await replicate(p)

    # Both agents restart: the daemon and the mirror go on, and are found again.
    await p.restart_agent("a")
    await p.restart_agent("b")
    assert [s.state for s in await p.a.client.replica_status(NAME)] == ["in_sync"]
    [listed] = await p.b.client.list_replicas()
    assert listed.daemon_alive and listed.path == str(replica)

    # 1. The daemon is killed: the job ends with the error, the guest never notices.
    qsd = int(repl.QsdExports.pidfile(replica).read_text())
    os.kill(qsd, signal.SIGKILL)

    async def degraded() -> ReplicaStatus | None:
        [s] = await p.a.client.replica_status(NAME)
        return s if s.state == "degraded" else None

    t0 = time.monotonic()
    s = await wait_for("the replica to be reported degraded", degraded, 15)
    print(f"[replication] daemon killed: degraded after {time.monotonic() - t0:.2f} s ({s.error})")
    assert s.error and "Input/output error" in s.error
    await writes_go_on(p.a)
    assert not (await p.b.client.list_replicas())[0].daemon_alive

    # 2. Rebuild: detach, a fresh replica, a full copy.
    await p.a.client.detach_replica(NAME, "disk0")
    assert [s.state for s in await p.a.client.replica_status(NAME)] == ["none"]
    assert (await p.b.client.delete_replica(NAME)).removed == [str(replica)]
    _, replica = await replicate(p)
    await writes_go_on(p.a, 5)

    # 3. The new daemon hangs (SIGSTOP: TCP still acknowledges, NBD never answers): guest writes
    # block until the guard cuts the connection; then they go on and the replica is degraded.
    qsd = int(repl.QsdExports.pidfile(replica).read_text())
    os.kill(qsd, signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        s = await wait_for("the guard to give up on the hung replica", degraded, repl.STALL_S + 15)
        print(f"[replication] daemon hung: degraded after {time.monotonic() - t0:.2f} s ({s.error})")
        assert s.error and "did not answer" in s.error
        await writes_go_on(p.a)
        await p.a.client.detach_replica(NAME, "disk0")
    finally:
        os.kill(qsd, signal.SIGCONT)
    assert (await p.b.client.delete_replica(NAME)).removed == [str(replica)]
    assert not pid_alive(qsd) and pids_under(p.root / "b") == []
    assert [s.state for s in await p.a.client.replica_status(NAME)] == ["none"]
    await writes_go_on(p.a, 3)
