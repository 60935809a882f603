"""Installing from an ISO on real QEMU: Debian's installer, made into a bootable ISO here, boots from a VM's
CD drive to its first screen; the disc is ejected and inserted again while the VM runs.

The ISO is built once per session from the ``debian-installer-12-netboot-amd64`` package (the text
installer's ``linux`` and ``initrd.gz``) with ``grub-mkrescue`` (BIOS El Torito), imported into the image
store as an ISO image, and put in the drive of a VM with a blank disk and the boot order ``cdrom,disk``.
The screen is read with QMP ``screendump`` (PPM): one as soon as QEMU answers (the firmware's text
screen), then every 2 s until the installer's dialog (its blue background covers most of the screen).
The time to that screen is printed (``-s``).

Run under the machine's QEMU lock:
``flock /tmp/kasou-qemu.lock .venv/bin/pytest -s tests/integration/test_cdrom.py``.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from kasou.errors import InvalidSpec, NotFound, WrongState
from kasou.hypervisor.base import LaunchDisk, LaunchSpec, RuntimeState
from kasou.hypervisor.qemu import media
from kasou.hypervisor.qemu.driver import QemuDriver
from kasou.image import import_image, load_image
from tests.integration.qemu_rig import AgentHost, end_processes, make_driver, scratch, wait_for

pytestmark = [pytest.mark.qemu, pytest.mark.shares_machine, pytest.mark.timeout(300)]  # beside the fast tests

INSTALLER = Path("/usr/lib/debian-installer/images/12/amd64/text/debian-installer/amd64")
NAME = "inst1"
UUID = "5eb1a5e0-0000-4000-8000-0000000000c1"
MEMORY = 512  # the installer runs in less (256 MiB: its "low memory mode"), but shows its first dialog at 512
INSTALLER_BLUE = bytes.fromhex("0000aa")  # the background of the installer's (newt) dialogs
SCREEN_TIMEOUT_S = 150.0
GRUB_CFG = """set timeout=0
set default=0
menuentry "Debian installer" {
  set gfxpayload=text
  linux /install/linux priority=low ---
  initrd /install/initrd.gz
}
"""


@pytest.fixture(scope="session")
def installer_iso() -> Iterator[Path]:
    """A bootable ISO of Debian's text installer (grub-mkrescue), in a scratch directory removed at the end."""
    missing = [p for p in (INSTALLER / "linux", INSTALLER / "initrd.gz") if not p.is_file()]
    if missing or shutil.which("grub-mkrescue") is None:
        pytest.fail("install debian-installer-12-netboot-amd64, grub-pc-bin, xorriso and mtools (scripts/install.sh)")
    root = scratch("kcdiso-")
    try:
        tree = root / "tree"
        (tree / "boot" / "grub").mkdir(parents=True)
        (tree / "install").mkdir()
        for f in ("linux", "initrd.gz"):
            shutil.copyfile(INSTALLER / f, tree / "install" / f)
        (tree / "boot" / "grub" / "grub.cfg").write_text(GRUB_CFG)
        iso = root / "debian-installer.iso"
        subprocess.run(["grub-mkrescue", "-o", str(iso), str(tree)], check=True, capture_output=True, timeout=120)
        yield iso
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
async def host(installer_iso: Path) -> AsyncIterator[AgentHost]:
    root = scratch("kcd-")
    images = root / "images"
    h = AgentHost.make(root, "h1", images, NAME)
    try:
        yield h
    finally:
        await h.close()
        await end_processes(root)
        shutil.rmtree(root, ignore_errors=True)


def colours(ppm: bytes) -> tuple[int, int, Counter[bytes]]:
    """Width, height and a sample of the pixel colours of a binary PPM (P6, 255)."""
    magic, size, depth, pixels = ppm.split(b"\n", 3)
    assert magic == b"P6" and depth == b"255"
    w, h = (int(x) for x in size.split())
    return w, h, Counter(pixels[i : i + 3] for i in range(0, w * h * 3, 3 * 13))


async def screen(h: AgentHost, n: int) -> bytes:
    """A screendump of the VM's VGA display (QEMU writes it as the VM's user: into its runtime directory)."""
    path = h.root / "run" / NAME / f"screen{n}.ppm"
    await h.qmp("screendump", {"filename": str(path)})
    data = path.read_bytes()
    path.unlink()
    return data


async def test_installer_iso_boots_to_its_first_screen(host: AgentHost, installer_iso: Path) -> None:
    h = host
    images = h.root / "images"
    # The ISO becomes an image of kind iso; a file that is not one is refused, and nothing is left.
    not_iso = h.root / "not.iso"
    not_iso.write_bytes(b"\0" * 64 * 1024)
    with pytest.raises(InvalidSpec, match="not an ISO 9660 image"):
        import_image(images, "bad", not_iso, kind="iso")
    assert not (images / "bad").exists()
    art = import_image(images, "debian-installer", installer_iso)
    assert (art.kind, art.firmware, art.disk_size_bytes) == ("iso", ("bios",), installer_iso.stat().st_size)
    assert load_image(images, "debian-installer").kind == "iso"

    disk = h.disks / NAME / "disk0.qcow2"
    disk.parent.mkdir(parents=True)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "2G"], check=True, timeout=30)
    spec = LaunchSpec(
        name=NAME, uuid=UUID, vcpus=1, memory_mib=MEMORY, cdrom_drive=True, cdrom="debian-installer",
        boot=["cdrom", "disk"], disks=[LaunchDisk(id="disk0", path=str(disk))],
    )  # fmt: skip
    t0 = time.monotonic()
    info = await h.client.start(spec)
    assert info.state == RuntimeState.RUNNING and info.pid is not None
    if h.driver.confine.enabled:  # QEMU reads the shared ISO as the VM's own user, never root
        uid = next(int(ln.split()[1]) for ln in Path(f"/proc/{info.pid}/status").read_text().splitlines()
                   if ln.startswith("Uid:"))  # fmt: skip
        assert uid != 0
    early = await screen(h, 0)
    w0, h0, first = colours(early)
    assert INSTALLER_BLUE not in first  # the firmware's text screen, before the installer

    installer_at = None
    n = 1
    while time.monotonic() - t0 < SCREEN_TIMEOUT_S:
        shot = await screen(h, n)
        n += 1
        w, ht, seen = colours(shot)
        if seen[INSTALLER_BLUE] > 0.5 * sum(seen.values()):
            installer_at = time.monotonic() - t0
            break
        await asyncio.sleep(2)
    assert installer_at is not None, f"no installer screen within {SCREEN_TIMEOUT_S:.0f} s ({n} screendumps)"
    total = sum(seen.values())
    assert shot != early and seen != first  # not the firmware's screen
    assert total - seen[b"\0\0\0"] > 0.5 * total  # not blank
    print(f"\ninstaller ISO ({art.disk_size_bytes / 2**20:.0f} MiB): first screen {installer_at:.1f} s after start "
          f"(TCG, {MEMORY} MiB, {n} screendumps; firmware screen {w0}x{h0}, installer {w}x{ht})")  # fmt: skip

    # The disc changes while the guest runs: eject, insert again; refusals change nothing.
    async def execute(command: str, arguments: dict[str, Any] | None = None) -> Any:
        return await h.qmp(command, arguments)

    assert (await media.inserted(execute)) == str(art.disk)
    await h.client.change_medium(NAME, None)
    assert (await media.inserted(execute)) is None
    with pytest.raises(NotFound, match="not in this host's image store"):
        await h.client.change_medium(NAME, "no-such-iso")
    await h.client.change_medium(NAME, "debian-installer")
    assert (await media.inserted(execute)) == str(art.disk)
    assert art.disk.stat().st_mode & 0o777 == 0o444  # read-only for every VM, never given away

    await h.client.action(NAME, "stop")
    with pytest.raises((NotFound, WrongState)):
        await h.client.change_medium(NAME, None)


async def test_live_migration_with_a_cd_inserted_and_ejected(host: AgentHost, installer_iso: Path) -> None:
    """The drive travels: a disc ejected on the source is absent on the destination (whose command line has
    an empty drive), a disc inserted there is in the drive after the migration back (shared storage)."""
    h = host
    images = h.root / "images"
    art = import_image(images, "debian-installer", installer_iso)
    peer = make_driver(h.root / "peer", images)
    await peer.attach_all()
    disk = h.disks / NAME / "disk0.qcow2"
    disk.parent.mkdir(parents=True)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "1G"], check=True, timeout=30)
    spec = LaunchSpec(
        name=NAME, uuid=UUID, vcpus=1, memory_mib=256, cdrom_drive=True, cdrom="debian-installer",
        boot=["cdrom", "disk"], disks=[LaunchDisk(id="disk0", path=str(disk))],
    )  # fmt: skip

    def on(drv: QemuDriver) -> media.Execute:
        async def execute(command: str, arguments: dict[str, Any] | None = None) -> Any:
            return await drv._qmp(drv._vms[NAME], command, arguments)

        return execute

    async def move(src: QemuDriver, dst: QemuDriver, launch: LaunchSpec) -> float:
        t = time.monotonic()
        inc = await dst.prepare_incoming(launch, "shared", "127.0.0.1")
        await src.migrate_out(NAME, inc)

        async def completed() -> bool:
            st = await src.migration_status(NAME)
            assert st.status not in ("failed", "cancelled", "none"), st
            return st.status == "completed"

        await wait_for("the migration to complete", completed, 60)
        assert (await dst.finish_incoming(NAME)).state == RuntimeState.RUNNING
        await src.finish_out(NAME)
        return time.monotonic() - t

    try:
        await h.driver.start(spec)
        assert await media.inserted(on(h.driver)) == str(art.disk)
        await h.driver.change_medium(NAME, None)
        there = await move(h.driver, peer, spec.model_copy(update={"cdrom": None}))
        assert await media.inserted(on(peer)) is None
        await peer.change_medium(NAME, "debian-installer")
        back = await move(peer, h.driver, spec)
        assert await media.inserted(on(h.driver)) == str(art.disk)
        print(f"\nmigrations with a CD drive: {there:.1f} s there (drive empty), {back:.1f} s back (ISO in)")
    finally:
        await peer.close()
