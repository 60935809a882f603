"""Incremental vs full backup of a running VM's 1 GiB disk with 50 MiB changed, side by side in one run.

A tiny guest runs from a 1 GiB qcow2 whose space beyond the guest's file system
(64 MiB .. 1 GiB) is filled with data first, so a full backup really copies a
gigabyte. Then, while the guest runs and writes: a full backup (generation 1);
50 MiB changed through QEMU's own block layer (``qemu-io`` on the guest's device,
1 MiB at 50 random offsets, so QEMU's dirty bitmap sees guest-like writes); an
incremental backup (generation 2); and a second full backup of the same, changed
disk (generation 3). Everything goes through the host agent, as kasou runs it.

Prints, for each: the copy time (QEMU's backup job), the verification time
(``qemu-img check`` and the content digest), the bytes QEMU copied and the bytes
the new file takes; and the incremental's bytes written / data changed (target
<= 2) and its copy time / the full backup's.

    flock /tmp/kasou-qemu.lock .venv/bin/python bench/backup.py
"""

from __future__ import annotations

import asyncio
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import ensure_image, images_dir
from kasou.agent.app import Agent, create_agent_app
from kasou.agent.client import AgentClient
from kasou.agent.models import BackupCreate, BackupMade, BackupSource
from kasou.agent.storage import LocalDisks
from kasou.hypervisor.backups import bitmap_name
from kasou.hypervisor.base import LaunchDisk, LaunchSpec
from kasou.hypervisor.qemu.driver import QemuDriver

MiB = 1 << 20
DISK = 1024 * MiB
CHANGED = 50 * MiB
NAME = "bkbench"
DEVICE = "/machine/peripheral/disk0-dev/virtio-backend"


def sh(*argv: str, timeout: float = 600) -> None:
    subprocess.run(argv, check=True, capture_output=True, timeout=timeout)


async def main() -> None:
    ensure_image()
    from kasou.image import load_image

    images = images_dir()
    art = load_image(images, "tiny")
    root = Path(tempfile.mkdtemp(prefix="kasou-bkb-", dir="/tmp"))
    driver = QemuDriver(root / "run", root / "log", images, os.environ.get("KASOU_ACCEL", "tcg"))
    agent = Agent(
        host="h1", driver=driver, disks=LocalDisks(root / "disks", images), accelerator="tcg",
        accelerator_reason="bench", qemu_version="7.2", images=lambda: ["tiny"], backup_dir=root / "backups",
    )  # fmt: skip
    client = AgentClient("h1", transport=httpx.ASGITransport(app=create_agent_app(agent)))
    disk = root / "disks" / NAME / "disk0.qcow2"
    disk.parent.mkdir(parents=True)
    try:
        print(f"preparing a {DISK // MiB} MiB disk: the guest's file system, then data up to the end ...", flush=True)
        sh("qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", str(art.disk), str(disk))
        sh("qemu-img", "resize", "-q", "-f", "qcow2", str(disk), str(DISK))
        fs = art.disk_size_bytes
        sh("qemu-io", "-f", "qcow2", "-c", f"write -P 0x11 {fs} {DISK - fs}", str(disk))
        await driver.attach_all()
        spec = LaunchSpec(name=NAME, uuid="5eb1a5e0-0000-4000-8000-00000000bb01", vcpus=1, memory_mib=128,
                          image="tiny", disks=[LaunchDisk(id="disk0", path=str(disk))])  # fmt: skip
        await client.start(spec)
        log = root / "log" / f"{NAME}.log"
        deadline = time.monotonic() + 120
        while "seq 3" not in (log.read_text(errors="replace") if log.exists() else ""):
            if time.monotonic() > deadline:
                raise TimeoutError("the guest did not start writing")
            await asyncio.sleep(0.2)

        async def backup(gen: int, prev: BackupMade | None) -> BackupMade:
            src = BackupSource(disk_id="disk0", path=str(disk), backing=prev.files[0].path if prev else None,
                               base_bitmap=bitmap_name(f"gen{gen - 1}") if prev else None)  # fmt: skip
            return await client.create_backup(NAME, BackupCreate(generation=gen, backup_id=f"gen{gen}", disks=[src]))

        full = await backup(1, None)
        vm = driver._vms[NAME]
        rng = random.Random(7)
        offsets = rng.sample(range(fs // MiB, DISK // MiB), CHANGED // MiB)
        for i, off in enumerate(offsets):
            line = f'qemu-io -d {DEVICE} "write -P {0x40 + i % 64} {off}M 1M"'
            out = await driver._qmp(vm, "human-monitor-command", {"command-line": line})
            assert "rror" not in str(out), out
        inc = await backup(2, full)
        full2 = await backup(3, None)
        seqs = log.read_text(errors="replace").count("\nseq ")

        def row(what: str, m: BackupMade) -> str:
            f = m.files[0]
            return (f"{what:28} {f.kind:12} copy {m.copy_s:6.2f} s  verify {m.verify_s:6.2f} s  "
                    f"copied {f.bytes_copied / MiB:7.1f} MiB  file {f.file_bytes / MiB:7.1f} MiB")  # fmt: skip

        print(f"\nbackup of a running VM, {DISK // MiB} MiB disk, {CHANGED // MiB} MiB changed (QEMU 7.2, TCG)")
        print(row("full (generation 1)", full))
        print(row("incremental (generation 2)", inc))
        print(row("full again (generation 3)", full2))
        written = inc.files[0].file_bytes
        print(f"incremental: bytes written / changed = {written / CHANGED:.2f} (target <= 2), "
              f"bytes copied / changed = {inc.files[0].bytes_copied / CHANGED:.2f}")  # fmt: skip
        print(f"incremental copy time / full copy time = {inc.copy_s / full2.copy_s:.2f} "
              f"({inc.copy_s:.2f} s vs {full2.copy_s:.2f} s); with verification "
              f"{(inc.copy_s + inc.verify_s) / (full2.copy_s + full2.verify_s):.2f}")  # fmt: skip
        print(f"the guest went on writing throughout ({seqs} fsync'd lines on its console)")
    finally:
        await driver.close()
        await client.close()
        for d in Path("/proc").iterdir():
            if d.name.isdigit():
                try:
                    args = (d / "cmdline").read_bytes().decode(errors="replace")
                except OSError:
                    continue
                if "qemu-system" in args and str(root) in args:
                    os.kill(int(d.name), signal.SIGKILL)
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    asyncio.run(main())
