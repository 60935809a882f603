"""Mirrored disks (RAID-1 on one host): guest write throughput mirrored vs single, and rebuild speed.

One tiny guest (QemuDriver, TCG), in rounds whose order rotates: its disk alone ("single"), then
with a second copy in another directory kept in sync by kasou's mirror (write-blocking
``blockdev-mirror``, as ``kasou vm create --mirror`` runs it). The workloads of
``bench/replication.py`` (4 KiB O_DIRECT writes, 4 KiB append+fsync, 1 MiB O_DIRECT writes), timed
by the guest's own clock. Target: mirrored >= 0.8x single.

Then the rebuild: the guest's disk is filled with FILL_MIB of random data, a loop in the guest
keeps writing (64 KiB with fsync, besides the writer's seq lines), and a new second copy is built
(``attach_mirror``, sync full) until in sync: MiB/s of the data the disk holds. Beside it, in the
same run, ``qemu-img convert`` of the same disk to the same directory (a plain copy, the lower bound
of the time a copy takes here).

    flock /tmp/kasou-qemu.lock .venv/bin/python bench/mirror.py [--runs 5]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import READY, ensure_image, images_dir, kill_pids, median, wait_line
from kasou.hypervisor.base import LaunchDisk, LaunchSpec
from kasou.hypervisor.qemu.driver import QemuDriver
from kasou.image import load_image
from replication import WORKLOADS, Console

NAME = "mirrorbench"
CONFIGS = ("single", "mirrored")
FILL_MIB = 40


def blank(path: Path, size: int) -> Path:
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), str(size)], check=True, timeout=30)
    return path


async def wait_in_sync(driver: QemuDriver, timeout: float = 600) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        [st] = await driver.mirror_status(NAME)
        if st.state == "in_sync":
            return time.monotonic() - t0
        assert st.state == "syncing", st
        await asyncio.sleep(0.01)  # a copy here takes a few tenths of a second
    raise TimeoutError("the mirror was not in sync in time")


async def bench(tmp: Path, runs: int) -> tuple[dict[str, dict[str, list[float]]], list[tuple[float, float, int]]]:
    art = load_image(images_dir(), "tiny")
    (tmp / "a").mkdir()
    (tmp / "b").mkdir()
    disk = tmp / "a" / "disk0.qcow2"
    subprocess.run(["qemu-img", "convert", "-q", "-f", art.disk_format, "-O", "qcow2", str(art.disk), str(disk)],
                   check=True, timeout=60)  # fmt: skip
    size = art.disk_size_bytes
    driver = QemuDriver(tmp / "run", tmp / "log", images_dir(), "tcg")
    await driver.attach_all()
    res: dict[str, dict[str, list[float]]] = {c: {w: [] for w in WORKLOADS} for c in CONFIGS}
    rebuilds: list[tuple[float, float, int]] = []
    try:
        # Started with werror/rerror=stop as a mirrored disk is; no second copy attached yet.
        spec = LaunchSpec(name=NAME, uuid="5eb1a5e0-0000-4000-8000-0000000000c1", vcpus=1, memory_mib=128,
                          image="tiny", disks=[LaunchDisk(id="disk0", path=str(disk))])  # fmt: skip
        await driver.start(spec)
        log = tmp / "log" / f"{NAME}.log"
        wait_line(log, READY, 120)
        await asyncio.sleep(1)
        console = Console(tmp / "run" / NAME / "serial.sock", log)
        for i in range(runs):
            order = CONFIGS[i % len(CONFIGS) :] + CONFIGS[: i % len(CONFIGS)]
            for config in order:
                second = tmp / "b" / f"r{i}.qcow2"
                if config == "mirrored":
                    blank(second, size)
                    await driver.attach_mirror(NAME, "disk0", str(second), "full")
                    print(f"  round {i + 1} mirrored: in sync {await wait_in_sync(driver):.2f} s after attach",
                          flush=True)  # fmt: skip
                for w, (cmd, amount, _) in WORKLOADS.items():
                    secs = await console.run(cmd)
                    res[config][w].append(amount / secs)
                    await console.run("rm -f /data/b; sync")
                if config == "mirrored":
                    [st] = await driver.mirror_status(NAME)
                    assert st.state == "in_sync", st  # it stayed in sync through the writes
                    await driver.detach_mirror(NAME, "disk0")
                    second.unlink()

        # Rebuild while the guest writes.
        await console.run(f"dd if=/dev/urandom of=/data/fill bs=1M count={FILL_MIB}; sync", timeout=600)
        await console.run("(while true; do dd if=/dev/zero of=/data/w bs=64k count=1 conv=fsync; done) "
                          "</dev/null >/dev/null 2>&1 &")  # fmt: skip
        held = int(subprocess.run(["du", "-B1", str(disk)], capture_output=True, text=True).stdout.split()[0])
        for i in range(runs):
            second = blank(tmp / "b" / f"rebuild{i}.qcow2", size)
            await driver.attach_mirror(NAME, "disk0", str(second), "full")
            secs = await wait_in_sync(driver)
            await driver.detach_mirror(NAME, "disk0")
            second.unlink()
            copy = tmp / "b" / f"copy{i}.qcow2"
            t0 = time.monotonic()
            subprocess.run(["qemu-img", "convert", "-U", "-q", "-O", "qcow2", str(disk), str(copy)], check=True,
                           timeout=600)  # fmt: skip
            plain = time.monotonic() - t0
            copy.unlink()
            rebuilds.append((secs, plain, held))
            print(f"  rebuild {i + 1}: {secs:.2f} s (qemu-img convert of the same disk: {plain:.2f} s)", flush=True)
        await driver.stop(NAME)
    finally:
        await driver.close()
    return res, rebuilds


def main() -> None:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    ensure_image()
    tmp = Path(tempfile.mkdtemp(prefix="kasou-bench-mirror-", dir="/tmp"))
    try:
        res, rebuilds = asyncio.run(bench(tmp, args.runs))
    finally:
        pids = []
        for d in Path("/proc").iterdir():
            with contextlib.suppress(OSError):
                if d.name.isdigit() and str(tmp) in (d / "cmdline").read_bytes().decode(errors="replace"):
                    pids.append(int(d.name))
        kill_pids([p for p in pids if p != os.getpid()])
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"\n{'':26}" + "".join(f"{c:>20}" for c in CONFIGS) + f"   (medians of {args.runs})")
    for w, (_, _, unit) in WORKLOADS.items():
        print(f"{w:26}" + "".join(f"{median(res[c][w]):13.1f} {unit:>6}" for c in CONFIGS))
    ratios = ", ".join(f"{w} {median(res['mirrored'][w]) / median(res['single'][w]):.2f}" for w in WORKLOADS)
    print(f"ratio mirrored/single: {ratios}   (target >= 0.8)")
    held = rebuilds[0][2]
    secs = median([r[0] for r in rebuilds])
    plain = median([r[1] for r in rebuilds])
    print(f"rebuild of a disk holding {held / 2**20:.1f} MiB while the guest writes: median {secs:.2f} s = "
          f"{held / 2**20 / secs:.1f} MiB/s; qemu-img convert of the same disk {plain:.2f} s = "
          f"{held / 2**20 / plain:.1f} MiB/s; ratio rebuild/copy time {secs / plain:.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
