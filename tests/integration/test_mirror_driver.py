"""Mirrored disks (RAID-1 on one host) with real QEMU and the tiny guest's writer, at the driver.

A copy fails while the guest writes (its file removed; its pool full, so its writes fail with
ENOSPC): the guest goes on writing with no ``seq`` lost, the disk shows ``degraded``; a new second
copy is built while the guest writes, and after a clean stop both copies are identical
(``qemu-img compare``). Run under the machine's QEMU lock:
``flock /tmp/kasou-qemu.lock .venv/bin/pytest tests/integration/test_mirror_driver.py``.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import shutil
import subprocess
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from kasou.hypervisor.base import LaunchSpec, MirrorStatus, RuntimeState
from kasou.hypervisor.qemu.driver import QemuDriver
from tests.integration.qemu_rig import (
    console_log,
    end_processes,
    make_driver,
    qcow2_copy,
    scratch,
    seqs,
    tiny_disk,
    tiny_spec,
    wait_for,
)

pytestmark = [
    pytest.mark.qemu,
    pytest.mark.shares_machine,
    pytest.mark.timeout(300),
]  # beside the fast tests (scripts/test.sh): tiny guests, no timing

NAME = "mirror1"


@dataclass
class Rig:
    root: Path
    driver: QemuDriver
    image_disk: Path

    def log(self) -> str:
        return console_log(self.root / "log", NAME)

    def seqs(self) -> list[int]:
        return seqs(self.log())

    def disk(self, pool: str) -> Path:
        d = self.root / pool
        d.mkdir(exist_ok=True)
        return d / f"{NAME}-disk0.qcow2"

    def make_copy(self, path: Path) -> Path:
        return qcow2_copy(self.image_disk, path)

    def blank(self, path: Path) -> Path:
        size = subprocess.run(["qemu-img", "info", "--output=json", "-f", "raw", str(self.image_disk)],
                              check=True, timeout=30, capture_output=True, text=True).stdout  # fmt: skip
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), str(json.loads(size)["virtual-size"])],
                       check=True, timeout=30)  # fmt: skip
        return path

    def spec(self, source: Path, second: Path | None, sync: str = "full") -> LaunchSpec:
        mirror, mirror_sync = (str(second) if second else None), ("none" if sync == "none" else "full")
        return tiny_spec(NAME, "5eb1a5e0-0000-4000-8000-0000000000b1", source, mirror=mirror, mirror_sync=mirror_sync)

    async def status(self) -> MirrorStatus:
        return (await self.driver.mirror_status(NAME))[0]

    async def writes_go_on(self, more: int = 10, timeout: float = 40) -> None:
        n = (self.seqs() or [0])[-1]

        async def advanced() -> bool:
            return (self.seqs() or [0])[-1] >= n + more

        await wait_for(f"the guest to write {more} more lines", advanced, timeout)


@pytest.fixture
async def rig(tiny_image: Path) -> AsyncIterator[Rig]:
    image_disk = tiny_disk(tiny_image)
    root = scratch("kasou-mirror-")
    driver = make_driver(root, tiny_image)
    await driver.attach_all()
    r = Rig(root, driver, image_disk)
    try:
        yield r
    finally:
        with contextlib.suppress(Exception):
            await driver.stop(NAME)
        await driver.close()
        await end_processes(root, check=False)
        small = root / "small"
        if small.is_mount():
            subprocess.run(["umount", "-l", str(small)], check=False, timeout=30)
        shutil.rmtree(root, ignore_errors=True)


def seq_gaps(values: list[int]) -> list[int]:
    return [b for a, b in itertools.pairwise(values) if b != a + 1]


async def boot(r: Rig, source: Path, second: Path) -> None:
    await r.driver.start(r.spec(source, second))

    async def ready() -> MirrorStatus | None:
        info = await r.driver.info(NAME)
        assert info is not None and info.state == RuntimeState.RUNNING, info
        st = await r.status()
        return st if info.guest_ready and st.state == "in_sync" and len(r.seqs()) >= 3 else None

    await wait_for("the guest to write on an in-sync mirror", ready, 90)


async def test_second_copy_removed_then_rebuilt(rig: Rig) -> None:
    r = rig
    a, b = r.make_copy(r.disk("pool-a")), r.blank(r.disk("pool-b"))
    await boot(r, a, b)
    b.unlink()  # the second copy vanishes

    async def degraded() -> MirrorStatus | None:
        st = await r.status()
        return st if st.state == "degraded" else None

    st = await wait_for("the disk to show degraded", degraded, 15)
    assert st.failed == str(b) and st.path == str(a) and "removed" in (st.error or ""), st
    await r.writes_go_on()

    c = r.blank(r.disk("pool-c"))  # rebuild onto a third pool while the guest writes
    await r.driver.attach_mirror(NAME, "disk0", str(c), "full")
    st = await wait_for("the rebuilt copy to be in sync", lambda: _in_sync(r), 60)
    assert st.second == str(c) and st.error is None
    await r.writes_go_on()
    await r.driver.stop(NAME)
    assert seq_gaps(r.seqs()) == [], "a write was lost or repeated"
    cmp = subprocess.run(["qemu-img", "compare", "-q", str(a), str(c)], timeout=60)
    assert cmp.returncode == 0, "the copies differ after a clean stop"


async def _in_sync(r: Rig) -> MirrorStatus | None:
    st = await r.status()
    return st if st.state == "in_sync" else None


async def test_full_pool_under_the_running_copy(rig: Rig) -> None:
    """The pool of the copy the guest runs on fills up: the disk switches to the second copy, the guest sees nothing."""
    r = rig
    small = r.root / "small"
    small.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(small)], timeout=30).returncode != 0:
        pytest.skip("cannot mount a small tmpfs here")
    a = r.make_copy(small / "disk0.qcow2")
    b = r.blank(r.disk("pool-b"))
    await boot(r, a, b)
    # Fill the pool: the next cluster the guest's writes need cannot be allocated (ENOSPC).
    subprocess.run(["dd", "if=/dev/zero", f"of={small / 'filler'}", "bs=1M", "count=64"], capture_output=True,
                   timeout=60)  # fmt: skip

    async def switched() -> MirrorStatus | None:
        st = await r.status()
        return st if st.state == "degraded" and st.path == str(b) else None

    st = await wait_for("the disk to switch to its second copy", switched, 90)
    assert st.failed == str(a) and "no space" in (st.error or ""), st

    # The record names the new copy before QEMU is asked to switch (a status read never sees half a
    # switch), so the guest may be paused on the failed write for the moment the switch takes.
    async def running() -> bool | None:
        info = await r.driver.info(NAME)
        return True if info is not None and info.state == RuntimeState.RUNNING else None

    await wait_for("the guest to run on after the switch", running, 10)
    await r.writes_go_on()
    assert seq_gaps(r.seqs()) == [], "a write was lost or repeated"
    assert "error" not in r.log().lower().replace("kasou-error", ""), "the guest saw an I/O error"
