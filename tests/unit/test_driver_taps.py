"""When the QEMU driver makes and removes taps (no QEMU, no netlink: a recording HostNetwork)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterable, Sequence
from pathlib import Path

import pytest

from kasou.config import ConfineSettings
from kasou.errors import QemuStartError
from kasou.hypervisor.base import LaunchSpec, RuntimeState
from kasou.hypervisor.qemu.driver import QemuDriver, QemuVm
from kasou.hypervisor.qemu.network import HostNetwork, tap_name
from kasou.model.spec import NicSpec


class Recorder(HostNetwork):
    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, str, list[str]]] = []

    def plug(self, vm: str, nics: Sequence[NicSpec], owner: tuple[int, int] | None = None) -> list[str]:
        ids = [n.id for n in nics if n.network != "user"]
        self.calls.append(("plug", vm, ids))
        return [tap_name(vm, i) for i in ids]

    def unplug(self, vm: str, nic_ids: Iterable[str] = ()) -> list[str]:
        self.calls.append(("unplug", vm, list(nic_ids)))
        return []


def spec(name: str = "emr1", network: str = "clinical") -> LaunchSpec:
    return LaunchSpec(
        name=name,
        uuid="00000000-0000-0000-0000-000000000001",
        vcpus=1,
        memory_mib=128,
        nics=[NicSpec(id="net0", mac="52:54:00:00:00:01", network=network, vlan=10)],
    )


@pytest.fixture
def driver(tmp_path: Path) -> QemuDriver:
    # "false" stands in for QEMU: it exits 1 at once, so every start fails after the taps were made.
    # The taps' bookkeeping only: no VM user, cgroup or file hand-over (tests/unit/test_confine.py has those).
    return QemuDriver(
        tmp_path / "run", tmp_path / "serial", tmp_path / "images", "tcg", "false", Recorder(),
        confine=ConfineSettings(enabled=False),
    )  # fmt: skip


def calls(driver: QemuDriver) -> list[tuple[str, str, list[str]]]:
    assert isinstance(driver.network, Recorder)
    return driver.network.calls


async def test_a_failed_start_removes_the_taps_it_made(driver: QemuDriver) -> None:
    with pytest.raises(QemuStartError):
        await driver.start(spec())
    assert calls(driver) == [("plug", "emr1", ["net0"]), ("unplug", "emr1", ["net0"])]
    assert not (driver.run_dir / "emr1").exists()
    await driver.close()


async def test_user_nics_touch_no_network(driver: QemuDriver) -> None:
    with pytest.raises(QemuStartError):
        await driver.start(spec(network="user"))
    assert calls(driver) == []
    await driver.close()


def _gone_vm(driver: QemuDriver, name: str) -> QemuVm:
    files = driver._files(name)
    files.dir.mkdir(parents=True)
    return QemuVm(name, files, pid=2**22 + 1, started_at=None, accelerator="tcg", taps=["net0"])


async def test_a_vm_that_ended_loses_its_taps(driver: QemuDriver) -> None:
    vm = _gone_vm(driver, "a")
    driver._vms["a"] = vm
    await driver._ended(vm, locked=False)  # as the reaper does
    await asyncio.gather(*driver._unplugging)
    assert vm.state == RuntimeState.CRASHED
    assert calls(driver) == [("unplug", "a", ["net0"])]


async def test_the_reaper_never_pulls_the_taps_of_a_new_start(driver: QemuDriver) -> None:
    old = _gone_vm(driver, "a")
    new = QemuVm("a", old.files, pid=1, started_at=None, accelerator="tcg", taps=["net0"])  # pid 1 lives
    driver._vms["a"] = new  # started again before the reaper's unplug got the VM's lock
    await driver._ended(old, locked=False)
    await asyncio.gather(*driver._unplugging)
    assert calls(driver) == []


async def test_forget_removes_the_taps_of_a_vm_known_from_its_files_only(driver: QemuDriver) -> None:
    files = driver._files("b")
    files.dir.mkdir(parents=True)
    files.launch.write_text(json.dumps({"spec": spec("b").model_dump(), "accelerator": "tcg"}))
    await driver.forget("b")
    assert calls(driver) == [("unplug", "b", ["net0"])]
    assert not files.dir.exists()


async def test_attach_finds_a_dead_vm_and_removes_its_taps(driver: QemuDriver) -> None:
    files = driver._files("c")
    files.dir.mkdir(parents=True)
    files.launch.write_text(json.dumps({"spec": spec("c").model_dump(), "accelerator": "tcg"}))
    assert await driver.attach_all() == []
    assert calls(driver) == [("unplug", "c", ["net0"])]
    assert (await driver.info("c")).state == RuntimeState.CRASHED  # type: ignore[union-attr]
    await driver.close()
