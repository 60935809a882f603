"""A VM's serial console log outlives its QEMU and its run directory, but shows only to the VM (uuid) that
wrote it: a new VM of the same name never reads an earlier one's log (no QEMU: "false" stands in for it)."""

from __future__ import annotations

from pathlib import Path

import pytest

from kasou.errors import NotFound, QemuStartError
from kasou.hypervisor.base import LaunchSpec
from kasou.hypervisor.qemu.driver import QemuDriver

OLD = "00000000-0000-0000-0000-00000000000a"
NEW = "00000000-0000-0000-0000-00000000000b"


def spec(uuid: str) -> LaunchSpec:
    return LaunchSpec(name="lis", uuid=uuid, vcpus=1, memory_mib=128)


@pytest.fixture
def driver(tmp_path: Path) -> QemuDriver:
    return QemuDriver(tmp_path / "run", tmp_path / "serial", tmp_path / "images", "tcg", "false")


async def test_the_log_shows_only_to_the_vm_that_wrote_it(driver: QemuDriver) -> None:
    files = driver._files("lis")
    files.serial_log.parent.mkdir(parents=True)
    files.serial_log.write_text("lab results for patient 42\n")
    files.serial_owner.write_text(OLD)
    assert "patient 42" in await driver.console_log("lis", uuid=OLD)
    with pytest.raises(NotFound):
        await driver.console_log("lis", uuid=NEW)
    # A failed start of the new VM removes the earlier VM's log instead of taking it over.
    with pytest.raises(QemuStartError):
        await driver.start(spec(NEW))
    with pytest.raises(NotFound):
        await driver.console_log("lis", uuid=NEW)
    assert not files.serial_log.exists() or "patient 42" not in files.serial_log.read_text()
    await driver.close()


async def test_an_unmarked_log_shows_to_no_vm_by_uuid(driver: QemuDriver) -> None:
    files = driver._files("lis")
    files.serial_log.parent.mkdir(parents=True)
    files.serial_log.write_text("old\n")
    with pytest.raises(NotFound):
        await driver.console_log("lis", uuid=NEW)
    assert await driver.console_log("lis") == "old\n"  # the host's own reads still see it
    await driver.close()


async def test_a_failed_restart_keeps_the_vms_own_log(driver: QemuDriver) -> None:
    files = driver._files("lis")
    files.serial_log.parent.mkdir(parents=True)
    files.serial_log.write_text("why it crashed\n")
    files.serial_owner.write_text(OLD)
    with pytest.raises(QemuStartError):
        await driver.start(spec(OLD))
    assert "why it crashed" in await driver.console_log("lis", uuid=OLD)
    await driver.close()
