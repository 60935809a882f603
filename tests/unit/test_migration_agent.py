"""The agent's migration routes and client, end to end over two fake hosts (FakeDriver, no QEMU)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from kasou.errors import InvalidSpec, NotFound, WrongState
from kasou.hypervisor.base import LaunchDisk, LaunchSpec, RuntimeState
from tests.unit.conftest import Host


def spec(disk: Path, name: str = "emr1") -> LaunchSpec:
    return LaunchSpec(
        name=name,
        uuid="00000000-0000-0000-0000-000000000001",
        vcpus=1,
        memory_mib=128,
        disks=[LaunchDisk(id="disk0", path=str(disk), size_bytes=1024 * 1024)],
    )


async def start_on(h: Host, name: str = "emr1") -> Path:
    disk = h.disks / name / "disk0.qcow2"
    disk.parent.mkdir(parents=True)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "1M"], check=True)
    await h.client.start(spec(disk, name))
    return disk


async def run_to_completion(a: Host, name: str = "emr1") -> str:
    seen = []
    for _ in range(10):
        st = await a.client.migration_status(name)
        seen.append(st.status)
        if st.status == "completed":
            assert st.progress == 1.0 and st.downtime_ms is not None
            return ",".join(seen)
    raise AssertionError(seen)


async def test_copy_migration_through_the_agents(hosts: tuple[Host, Host]) -> None:
    a, b = hosts
    await start_on(a)
    dest_disk = b.disks / "emr1" / "disk0.qcow2"
    inc = await b.client.prepare_incoming(spec(dest_disk), "copy")
    assert inc.storage == "copy" and inc.nbd_host == "10.0.0.2"  # the agent's migration address
    assert inc.migration_uri.startswith("tcp:10.0.0.2:") and inc.exports == {"disk0": "disk0"}
    assert dest_disk.exists()
    assert (await b.client.info("emr1")).state == RuntimeState.INCOMING

    first = await a.client.migrate_out("emr1", inc, downtime_ms=50)
    assert first.status in ("mirroring", "active")
    with pytest.raises(WrongState):
        await a.client.action("emr1", "pause")  # nothing else happens to a migrating VM
    with pytest.raises(WrongState):
        await b.client.action("emr1", "resume")  # nor to one arriving
    with pytest.raises(WrongState):
        await b.client.finish_incoming("emr1")  # not complete yet
    assert "completed" in await run_to_completion(a)
    assert (await a.client.info("emr1")).state == RuntimeState.PAUSED

    info = await b.client.finish_incoming("emr1")
    assert info.state == RuntimeState.RUNNING and info.guest_ready
    await a.client.finish_out("emr1")
    with pytest.raises(NotFound):
        await a.client.info("emr1")
    await a.client.finish_out("emr1")  # a retry is harmless
    assert (await b.client.finish_incoming("emr1")).state == RuntimeState.RUNNING  # so is this one
    with pytest.raises(WrongState):
        await b.client.abort_incoming("emr1")  # it runs here now: never killed by an abort


async def test_shared_migration_with_an_explicit_address(hosts: tuple[Host, Host]) -> None:
    a, b = hosts
    disk = await start_on(a)
    inc = await b.client.prepare_incoming(spec(disk), "shared", listen_host="192.168.7.2")
    assert inc.storage == "shared" and inc.nbd_port is None
    assert inc.migration_uri.startswith("tcp:192.168.7.2:")
    await a.client.migrate_out("emr1", inc, bandwidth_mib_s=100, auto_converge=False)
    await run_to_completion(a)
    await b.client.finish_incoming("emr1")
    await a.client.finish_out("emr1")
    assert disk.exists()  # shared: the one disk stays


async def test_abort_leaves_the_vm_on_the_source(hosts: tuple[Host, Host]) -> None:
    a, b = hosts
    await start_on(a)
    dest_disk = b.disks / "emr1" / "disk0.qcow2"
    inc = await b.client.prepare_incoming(spec(dest_disk), "copy")
    a.driver.migration_polls = 5
    await a.client.migrate_out("emr1", inc)
    assert (await a.client.migration_status("emr1")).status in ("mirroring", "active")
    with pytest.raises(WrongState):
        await a.client.finish_out("emr1")  # never before it completed
    info = await a.client.abort_out("emr1")
    assert info.state == RuntimeState.RUNNING
    await b.client.abort_incoming("emr1")
    await b.client.abort_incoming("emr1")  # idempotent
    assert not dest_disk.exists() and not dest_disk.parent.exists()
    with pytest.raises(NotFound):
        await b.client.info("emr1")
    assert (await a.client.migration_status("emr1")).status == "none"


async def test_after_completed_abort_needs_force(hosts: tuple[Host, Host]) -> None:
    a, b = hosts
    await start_on(a)
    inc = await b.client.prepare_incoming(spec(b.disks / "emr1" / "disk0.qcow2"), "copy")
    await a.client.migrate_out("emr1", inc)
    await run_to_completion(a)
    with pytest.raises(WrongState):
        await a.client.abort_out("emr1")
    await b.client.abort_incoming("emr1")
    info = await a.client.abort_out("emr1", force=True)
    assert info.state == RuntimeState.RUNNING


async def test_failed_migration(hosts: tuple[Host, Host]) -> None:
    a, b = hosts
    await start_on(a)
    inc = await b.client.prepare_incoming(spec(b.disks / "emr1" / "disk0.qcow2"), "copy")
    a.driver.fail_next_migration = "Unable to write to socket: Connection reset by peer"
    await a.client.migrate_out("emr1", inc)
    st = await a.client.migration_status("emr1")
    assert st.status == "failed" and st.error and "Connection reset" in st.error
    assert (await b.client.info("emr1")).state == RuntimeState.CRASHED  # its QEMU gave up
    await a.client.abort_out("emr1")
    await b.client.abort_incoming("emr1")
    assert (await a.client.info("emr1")).state == RuntimeState.RUNNING


async def test_copy_disks_must_be_local_disks(hosts: tuple[Host, Host], tmp_path: Path) -> None:
    _, b = hosts
    with pytest.raises(InvalidSpec):
        await b.client.prepare_incoming(spec(tmp_path / "elsewhere" / "disk0.qcow2"), "copy")
    no_size = spec(b.disks / "emr1" / "disk0.qcow2")
    no_size.disks[0].size_bytes = None
    with pytest.raises(InvalidSpec):
        await b.client.prepare_incoming(no_size, "copy")
    assert not (b.disks / "emr1").exists()
