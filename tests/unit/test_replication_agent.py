"""Disk replication through the agents' routes and client, over two fake hosts (FakeDriver, no QEMU)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from kasou.errors import Conflict, HypervisorError, InvalidSpec, NotFound
from kasou.hypervisor.base import LaunchDisk, LaunchSpec, ReplicaTarget
from tests.doubles.driver import FakeExports
from tests.unit.conftest import Host

MiB = 1024 * 1024


def spec(disk: Path, name: str = "emr1", readonly: bool = False) -> LaunchSpec:
    return LaunchSpec(
        name=name,
        uuid="00000000-0000-0000-0000-000000000001",
        vcpus=1,
        memory_mib=128,
        disks=[LaunchDisk(id="disk0", path=str(disk), size_bytes=MiB, readonly=readonly)],
    )


async def start_on(h: Host, name: str = "emr1", readonly: bool = False) -> Path:
    disk = h.disks / name / "disk0.qcow2"
    disk.parent.mkdir(parents=True)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "1M"], check=True)
    await h.client.start(spec(disk, name, readonly))
    return disk


async def test_replica_lifecycle_on_the_replica_host(hosts: tuple[Host, Host]) -> None:
    _, b = hosts
    t = await b.client.create_replica("emr1", "disk0", MiB)
    path = b.disks / "emr1" / "disk0.replica.qcow2"
    assert t.vm == "emr1" and t.disk_id == "disk0" and t.path == str(path.absolute())
    assert t.nbd_host == "10.0.0.2" and t.nbd_port > 0 and "emr1" in t.export  # the agent's migration address
    assert path.exists()
    info = subprocess.run(["qemu-img", "info", "-U", str(path)], capture_output=True, text=True, check=True).stdout
    assert "virtual size: 1 MiB" in info and "qcow2" in info

    # The same request again is the same replica; another size is refused, and so is another address.
    assert await b.client.create_replica("emr1", "disk0", MiB) == t
    with pytest.raises(Conflict):
        await b.client.create_replica("emr1", "disk0", 2 * MiB)
    with pytest.raises(Conflict):
        await b.client.create_replica("emr1", "disk0", MiB, listen_host="10.9.9.9")

    [listed] = await b.client.list_replicas()
    assert (listed.vm, listed.disk_id, listed.path, listed.size_bytes) == ("emr1", "disk0", t.path, MiB)
    assert listed.daemon_alive and listed.file_exists and not listed.promoted

    # Its daemon died (a reboot): the same request serves the same file again, under a new export.
    FakeExports.kill(Path(t.path))
    assert not (await b.client.list_replicas())[0].daemon_alive
    again = await b.client.create_replica("emr1", "disk0", MiB)
    assert again.path == t.path and again.export != t.export and (await b.client.list_replicas())[0].daemon_alive

    removal = await b.client.delete_replica("emr1")
    assert removal.removed == [t.path] and removal.kept == []
    assert not path.exists() and not path.parent.exists()
    assert await b.client.list_replicas() == []
    assert (await b.client.delete_replica("emr1")).removed == []  # idempotent
    assert not FakeExports.served


async def test_delete_can_keep_the_file(hosts: tuple[Host, Host]) -> None:
    _, b = hosts
    t = await b.client.create_replica("emr1", "disk0", MiB)
    removal = await b.client.delete_replica("emr1", keep_file=True)
    assert removal.kept == [t.path] and removal.removed == []
    assert Path(t.path).exists() and await b.client.list_replicas() == [] and not FakeExports.served


async def test_names_are_checked(hosts: tuple[Host, Host]) -> None:
    _, b = hosts
    for vm, disk in (("../etc", "disk0"), ("emr1", "../x"), ("emr1", "a.b"), ("emr1", "0disk"), ("", "disk0")):
        with pytest.raises(InvalidSpec):
            await b.client.create_replica(vm, disk, MiB)
    with pytest.raises(InvalidSpec):  # the agent checks the body itself
        await b.client._call("POST", "/replicas", json={"vm": "emr1", "disk_id": "disk0", "size_bytes": 0})
    assert not b.disks.exists() or list(b.disks.iterdir()) == []


async def test_mirror_failover_and_rebuild(hosts: tuple[Host, Host]) -> None:
    a, b = hosts
    await start_on(a)
    assert [s.state for s in await a.client.replica_status("emr1")] == ["none"]

    t = await b.client.create_replica("emr1", "disk0", MiB)
    st = await a.client.attach_replica("emr1", t)
    assert st.state == "in_sync" and st.progress == 1.0 and (st.nbd_host, st.nbd_port) == (t.nbd_host, t.nbd_port)
    assert (await a.client.attach_replica("emr1", t)).state == "in_sync"  # the same target again: harmless
    other = ReplicaTarget(**{**t.model_dump(), "nbd_port": t.nbd_port + 100})
    with pytest.raises(Conflict):
        await a.client.attach_replica("emr1", other)  # another target for an attached disk

    # The replica's host dies: the VM goes on, its replica is degraded until rebuilt.
    FakeExports.kill(Path(t.path))
    [st] = await a.client.replica_status("emr1")
    assert st.state == "degraded" and st.error
    assert (await a.client.info("emr1")).state == "running"
    with pytest.raises(Conflict):
        await a.client.attach_replica("emr1", t)  # a degraded one is detached first
    await a.client.detach_replica("emr1", "disk0")
    await a.client.detach_replica("emr1", "disk0")  # idempotent
    assert [s.state for s in await a.client.replica_status("emr1")] == ["none"]
    await b.client.delete_replica("emr1")
    t2 = await b.client.create_replica("emr1", "disk0", MiB)
    assert (await a.client.attach_replica("emr1", t2)).state == "in_sync"

    # A test can degrade it too; then the VM's host dies and the replica is promoted.
    a.driver.degrade_replica("emr1", "disk0", "gone")
    assert (await a.client.replica_status("emr1"))[0].error == "gone"
    a.driver.crash("emr1")
    with pytest.raises(NotFound):
        await a.client.replica_status("emr1")
    p = await b.client.promote_replica("emr1")
    assert p.vm == "emr1" and p.disks == {"disk0": t2.path}
    assert await b.client.promote_replica("emr1") == p  # idempotent
    [listed] = await b.client.list_replicas()
    assert listed.promoted and not listed.daemon_alive and listed.file_exists
    with pytest.raises(Conflict):
        await b.client.create_replica("emr1", "disk0", MiB)  # it is a disk of the VM now
    with pytest.raises(Conflict):
        await b.client.delete_replica("emr1")  # never deleted as a replica
    info = await b.client.start(spec(Path(p.disks["disk0"])))
    assert info.state == "running"
    assert (await b.client.delete_replica("emr1", keep_file=True)).kept == [t2.path]
    assert Path(t2.path).exists() and await b.client.list_replicas() == []


async def test_migration_is_refused_while_a_replica_is_attached(hosts: tuple[Host, Host]) -> None:
    a, b = hosts
    disk = await start_on(a)
    t = await b.client.create_replica("emr1", "disk0", MiB)
    await a.client.attach_replica("emr1", t)
    inc = await b.client.prepare_incoming(spec(disk), "shared")
    with pytest.raises(Conflict):
        await a.client.migrate_out("emr1", inc)
    await a.client.detach_replica("emr1", "disk0")
    assert (await a.client.migrate_out("emr1", inc)).status in ("active", "completed")


async def test_attach_is_checked(hosts: tuple[Host, Host]) -> None:
    a, b = hosts
    with pytest.raises(NotFound):
        await a.client.replica_status("nope")
    await start_on(a)
    t = await b.client.create_replica("emr1", "disk0", MiB)
    with pytest.raises(InvalidSpec):
        await a.client.attach_replica("emr1", ReplicaTarget(**{**t.model_dump(), "disk_id": "disk9"}))
    with pytest.raises(HypervisorError):
        await a.client.attach_replica("emr1", ReplicaTarget(**{**t.model_dump(), "export": "nobody"}))
    with pytest.raises(NotFound):
        await a.client.attach_replica("nope", t)
    await start_on(a, "ro", readonly=True)
    with pytest.raises(InvalidSpec):
        await a.client.attach_replica("ro", t)
    assert [s.state for s in await a.client.replica_status("emr1")] == ["none"]


async def test_attach_without_waiting_reports_syncing(hosts: tuple[Host, Host]) -> None:
    a, b = hosts
    a.driver.replica_sync_polls = 2
    await start_on(a)
    t = await b.client.create_replica("emr1", "disk0", MiB)
    st = await a.client.attach_replica("emr1", t, timeout_s=0)
    assert st.state == "syncing" and 0 < st.progress < 1
    states = [(await a.client.replica_status("emr1"))[0].state for _ in range(3)]
    assert states == ["syncing", "in_sync", "in_sync"]
