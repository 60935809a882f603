"""The driver contract of devices that change while the guest runs (kasou.hypervisor.base.Driver.grow_disk,
plug_disk, unplug_disk, plug_nic, unplug_nic), one body for the fake and for QEMU (one booted tiny guest).

On QEMU the guest itself is the proof: its kernel logs the hot-added disk (``[vdb]``) and its new size, and
a live migration of the VM with the hot-added disk on its port completes (the destination's command line has
the same devices). Run the QEMU half under the machine's QEMU lock:
``flock /tmp/kasou-qemu.lock timeout 600 pytest tests/contract/test_device_contract.py -m qemu``.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from kasou.errors import Conflict, NotFound, OperationTimeout
from kasou.hypervisor.base import Driver, LaunchDisk, RuntimeState
from kasou.model.spec import NicSpec
from tests.contract.conftest import Rig

pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.timeout(240)]

MIB = 1024 * 1024


def _size(path: Path, shared_lock: bool = True) -> int:
    argv = ["qemu-img", "info", "--output=json", *(["-U"] if shared_lock else []), str(path)]
    r = subprocess.run(argv, capture_output=True, timeout=30)
    assert r.returncode == 0, r.stderr.decode()
    return int(json.loads(r.stdout)["virtual-size"])


def _blank(path: Path, size: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), str(size)], check=True, timeout=30)
    return path


async def test_hot_plug_grow_migrate_and_unplug(rig: Rig) -> None:
    src, dst = rig.driver, await rig.peer()
    spec = rig.spec("c-dev", pci_ports=4, kernel_args_extra="loglevel=6")  # the guest's kernel says what it sees
    name = spec.name
    await src.start(spec)
    holder = src
    try:

        async def ready() -> bool:
            now = await src.info(name)
            return now is not None and now.guest_ready

        await rig.until("the guest to be ready", ready, 90)
        d1 = _blank(rig.root / "disks" / name / "disk1.qcow2", 16 * MIB)
        disk1 = LaunchDisk(id="disk1", path=str(d1), size_bytes=16 * MIB, port=1)

        # Refusals first: nothing changes.
        with pytest.raises(NotFound):
            await src.plug_disk("c-nobody", disk1)
        with pytest.raises(Conflict):
            await src.plug_disk(name, disk1.model_copy(update={"port": 9}))  # it has 4 ports
        with pytest.raises(Conflict):
            await src.plug_disk(name, disk1.model_copy(update={"id": "disk0"}))  # has one already

        await src.plug_disk(name, disk1)
        with pytest.raises(Conflict):
            await src.plug_disk(name, disk1.model_copy(update={"id": "disk2"}))  # port 1 is taken
        if rig.real:  # the guest's kernel sees the new disk
            await _seen(rig, src, name, "[vdb]")

        await src.grow_disk(name, "disk1", 32 * MIB)
        assert _size(d1) == 32 * MIB
        with pytest.raises(NotFound):
            await src.grow_disk(name, "disk7", 32 * MIB)
        if rig.real:
            await _seen(rig, src, name, "[vdb] new size: 65536 512-byte logical blocks")

        nic = NicSpec(id="net1", mac="52:54:00:aa:bb:01", port=2)
        await src.plug_nic(name, nic)
        with pytest.raises(Conflict):
            await src.plug_nic(name, nic)

        # A live migration of the VM as it is now: the destination starts with the hot-added devices on their ports.
        now = spec.model_copy(update={"disks": [*spec.disks, disk1.model_copy(update={"size_bytes": 32 * MIB})],
                                      "nics": [*spec.nics, nic]})  # fmt: skip
        inc = await dst.prepare_incoming(now, "shared", "127.0.0.1")
        await src.migrate_out(name, inc)

        async def completed() -> bool:
            st = await src.migration_status(name)
            assert st.status not in ("failed", "cancelled", "none"), st
            return st.status == "completed"

        await rig.until("the migration to complete", completed, 90)
        arrived = await dst.finish_incoming(name)
        assert arrived.state == RuntimeState.RUNNING
        await src.finish_out(name)
        holder = dst

        # On the destination: the root bus cannot unplug; the hot-added devices come out.
        with pytest.raises(Conflict):
            await dst.unplug_disk(name, "disk0")
        with pytest.raises(NotFound):
            await dst.unplug_disk(name, "disk7")
        await dst.unplug_nic(name, "net1")
        with pytest.raises(NotFound):
            await dst.unplug_nic(name, "net1")
        await dst.unplug_disk(name, "disk1", timeout_s=30)
        if rig.real:
            assert _size(d1, shared_lock=False) == 32 * MIB  # QEMU let go of the file: no lock held
        with pytest.raises(NotFound):
            await dst.unplug_disk(name, "disk1")
        assert (await dst.info(name)) is not None and (await dst.info(name)).state == RuntimeState.RUNNING  # type: ignore[union-attr]
    finally:
        for drv in (src, dst):
            left = await drv.info(name)
            if left is not None and left.state == RuntimeState.INCOMING:
                await drv.abort_incoming(name)
            elif left is not None:
                await drv.stop(name)
                await drv.forget(name)
        del holder


async def test_an_unplug_the_guest_never_answers_times_out_and_keeps_the_device(rig: Rig) -> None:
    """A guest that has not booted (started paused: no kernel to answer) keeps the device; the error says so."""
    spec = rig.spec("c-dev2", pci_ports=2, paused=True)
    name = spec.name
    await rig.driver.start(spec)
    try:
        d1 = _blank(rig.root / "disks" / name / "disk1.qcow2", 8 * MIB)
        await rig.driver.plug_disk(name, LaunchDisk(id="disk1", path=str(d1), port=1))
        if not rig.real:
            rig.driver.unplug_hangs = True  # type: ignore[attr-defined]
        with pytest.raises(OperationTimeout, match="did not release device disk1-dev"):
            await rig.driver.unplug_disk(name, "disk1", timeout_s=2)
        with pytest.raises(OperationTimeout):  # asked again while the first request is pending: the same answer
            await rig.driver.unplug_disk(name, "disk1", timeout_s=1)
        with pytest.raises(Conflict):
            await rig.driver.plug_disk(name, LaunchDisk(id="disk2", path=str(d1), port=1))  # still there
    finally:
        if not rig.real:
            rig.driver.unplug_hangs = False  # type: ignore[attr-defined]
        await rig.driver.stop(name)
        await rig.driver.forget(name)


async def _seen(rig: Rig, driver: Driver, name: str, text: str) -> None:
    """Wait until the guest's kernel has said ``text`` on its console (its log shown if it never does)."""

    async def said() -> bool:
        return text in await driver.console_log(name)

    try:
        await rig.until(f"the guest to say {text!r}", said, 60)
    except AssertionError:
        print((await driver.console_log(name))[-3000:])
        raise
