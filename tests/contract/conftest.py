"""One driver contract, two drivers: every test of this directory runs against the fake and against QEMU.

The fixture ``rig`` is module-scoped and parametrized: ``fake`` (tests/doubles, no processes) and
``qemu`` (the real QemuDriver booting the tiny guest under TCG, marked ``qemu``; run it under the
machine's QEMU lock). The QEMU rig keeps its files under one short directory in /tmp; at its end it
kills every QEMU and qemu-storage-daemon whose command line names that directory, by pid, and
removes the directory.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest
import pytest_asyncio

from kasou.hypervisor.base import Driver, LaunchDisk, LaunchSpec
from tests.doubles.driver import FakeDriver
from tests.integration.conftest import tiny_image  # noqa: F401 - the QEMU rig's fixture
from tests.integration.qemu_rig import end_processes, make_driver, qcow2_copy, scratch, tiny_disk, wait_for

T = TypeVar("T")

FAKE_DISK_SIZE = 64 * 1024 * 1024
UUID = "c0c0c0c0-0000-4000-8000-0000000000{:02x}"


@dataclass
class Rig:
    """One kind of driver on one "host" (``driver``), a second one for migrations (``peer``), and
    LaunchSpecs of the tiny guest on disks of their own under ``root``."""

    kind: str  # "fake" or "qemu"
    root: Path
    driver: Driver
    make_peer: Callable[[], Driver]
    image_disk: Path | None  # the tiny guest's disk (QEMU); the fake gets empty qcow2 disks
    accelerator: str = "tcg"
    _peer: Driver | None = None
    _uuids: dict[str, str] = field(default_factory=dict)

    @property
    def real(self) -> bool:
        return self.kind == "qemu"

    def disk(self, vm: str) -> Path:
        """A new disk ``disk0`` for VM ``vm`` (the tiny guest's disk for QEMU; an empty qcow2 for the fake)."""
        path = self.root / "disks" / vm / "disk0.qcow2"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.unlink(missing_ok=True)
        if self.image_disk is not None:
            return qcow2_copy(self.image_disk, path)
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), str(FAKE_DISK_SIZE)], check=True,
                       timeout=30)  # fmt: skip
        return path

    def spec(self, vm: str, disk: Path | None = None, **kw: Any) -> LaunchSpec:
        """The tiny guest (1 vCPU, 128 MiB) named ``vm`` on one disk ``disk0`` (a new one unless given)."""
        uuid = self._uuids.setdefault(vm, UUID.format(len(self._uuids)))
        path = disk if disk is not None else self.disk(vm)
        return LaunchSpec(name=vm, uuid=uuid, vcpus=1, memory_mib=128, image="tiny",
                          disks=[LaunchDisk(id="disk0", path=str(path))], **kw)  # fmt: skip

    async def peer(self) -> Driver:
        """A second host's driver of the same kind (a migration's destination)."""
        if self._peer is None:
            self._peer = self.make_peer()
            await self._peer.attach_all()
        return self._peer

    async def crash(self, vm: str) -> None:
        """The VM's process dies without anyone asking (QEMU: SIGKILL)."""
        if isinstance(self.driver, FakeDriver):
            self.driver.crash(vm)
            return
        info = await self.driver.info(vm)
        assert info is not None and info.pid is not None, info
        os.kill(info.pid, signal.SIGKILL)

    async def until(self, what: str, cond: Callable[[], Awaitable[T | None]], timeout: float = 60.0) -> T:
        return await wait_for(what, cond, timeout)

    async def close(self) -> None:
        for d in (self.driver, self._peer):
            if d is not None:
                with contextlib.suppress(Exception):
                    await d.close()
        if self.real:
            await end_processes(self.root)
        shutil.rmtree(self.root, ignore_errors=True)


def qcow2_like(disk: Path, target: Path) -> Path:
    """An empty qcow2 at ``target`` of ``disk``'s virtual size (a second copy or a replica of it)."""
    out = subprocess.run(["qemu-img", "info", "-U", "--output=json", str(disk)], capture_output=True, check=True,
                         timeout=30)  # fmt: skip
    size = json.loads(out.stdout)["virtual-size"]
    target.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(target), str(size)], check=True, timeout=30)
    return target


@pytest_asyncio.fixture(
    scope="module", loop_scope="module", params=["fake", pytest.param("qemu", marks=pytest.mark.qemu)]
)
async def rig(request: pytest.FixtureRequest) -> AsyncIterator[Rig]:
    root = scratch("kasou-contract-")
    if request.param == "fake":
        r = Rig("fake", root, FakeDriver(), FakeDriver, None)
    else:
        images: Path = request.getfixturevalue("tiny_image")
        image_disk = tiny_disk(images)
        r = Rig("qemu", root, make_driver(root / "a", images), lambda: make_driver(root / "b", images), image_disk)
    try:
        await r.driver.attach_all()
        yield r
    finally:
        await r.close()


@dataclass
class Guest:
    """The VM the read-only and reversible checks share: it runs, its guest is ready."""

    name: str
    spec: LaunchSpec
    disk: Path
    pid: int


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def guest(rig: Rig) -> AsyncIterator[Guest]:
    spec = rig.spec("c-main")
    info = await rig.driver.start(spec)
    assert info.pid is not None

    async def ready() -> bool:
        now = await rig.driver.info(spec.name)
        return now is not None and now.guest_ready

    await rig.until("the shared guest to be ready", ready, 90)
    yield Guest(spec.name, spec, Path(spec.disks[0].path), info.pid)
    with contextlib.suppress(Exception):
        await asyncio.wait_for(rig.driver.stop(spec.name), 30)
