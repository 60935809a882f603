"""Disk replication: guest write throughput with a synchronously replicated disk vs a plain local disk.

One tiny guest (QemuDriver, TCG) and, in rounds whose order rotates, its disk
plain, replicated (the mirror in write-blocking mode into a qemu-storage-daemon
on 127.0.0.1, the default cache) and replicated with ``writethrough`` (the
replica flushes every write). Workloads typed on the guest's serial console,
timed by the guest's own clock:

* 4 KiB O_DIRECT writes (each waits for the device: write latency, as a
  database's log writes);
* 4 KiB appends each followed by fsync (a dd per commit: under TCG the fork
  and exec weigh most);
* 1 MiB O_DIRECT writes (bulk throughput): a 32 MiB file written over 8 times (the tiny guest's disk
  is 64 MiB), about a second under TCG, so the guest clock's 10 ms steps weigh 1 %; the 8 ``dd``
  start-ups (~15 ms each under TCG) are in every configuration alike.

Prints the medians over --runs and the ratios replicated/local (target >= 0.7).

    flock /tmp/kasou-qemu.lock .venv/bin/python bench/replication.py [--runs 5]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import READY, ensure_image, images_dir, kill_pids, median, wait_line
from kasou.hypervisor.base import LaunchDisk, LaunchSpec
from kasou.hypervisor.qemu.driver import QemuDriver
from kasou.hypervisor.qemu.replication import QsdExports
from kasou.image import load_image

NAME = "replbench"
DIRECT4K = 2000
FSYNC_LOOP = 40
DIRECT1M = 32
PASSES_1M = 8
#: Workload -> (the guest's command, what one run moves, the unit printed)
WORKLOADS = {
    "4k direct writes": (f"dd if=/dev/zero of=/data/b bs=4k count={DIRECT4K} oflag=direct", DIRECT4K, "IOPS"),
    "4k append+fsync": (
        f"i=0; while [ $i -lt {FSYNC_LOOP} ]; do dd if=/dev/zero of=/data/b bs=4k count=1 oflag=append "
        "conv=notrunc,fsync; i=$((i+1)); done",
        FSYNC_LOOP,
        "commits/s",
    ),
    "1M direct writes": (
        f"i=0; while [ $i -lt {PASSES_1M} ]; do dd if=/dev/zero of=/data/b bs=1M count={DIRECT1M} oflag=direct "
        "conv=notrunc; i=$((i+1)); done",
        DIRECT1M * PASSES_1M,
        "MiB/s",
    ),
}
CONFIGS = ("local", "replicated", "replicated+writethrough")


class Console:
    """The guest's serial console: one connection, always drained (an unread one stalls the guest's output)."""

    def __init__(self, sock: Path, log: Path) -> None:
        self.log = log
        self.s = socket.socket(socket.AF_UNIX)
        self.s.connect(str(sock))
        threading.Thread(target=self._drain, daemon=True).start()
        self.n = 0

    def _drain(self) -> None:
        with contextlib.suppress(OSError):
            while self.s.recv(65536):
                pass

    async def run(self, command: str, timeout: float = 300) -> float:
        """Run ``command`` in the guest; its duration in seconds by the guest's clock (10 ms steps)."""
        self.n += 1
        tag = f"BENCH{self.n}"
        line = f"read a _ </proc/uptime; {command} >/dev/null 2>&1; read b _ </proc/uptime; echo {tag} $a $b\n"
        self.s.sendall(line.encode())
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for ln in self.log.read_text(errors="replace").splitlines():
                parts = ln.split()
                if len(parts) == 3 and parts[0] == tag:
                    with contextlib.suppress(ValueError):
                        return max(float(parts[2]) - float(parts[1]), 0.01)
            await asyncio.sleep(0.05)
        raise TimeoutError(f"the guest did not finish {command!r} within {timeout:.0f} s")


async def bench(tmp: Path, runs: int) -> dict[str, dict[str, list[float]]]:
    art = load_image(images_dir(), "tiny")
    disk = tmp / "disk0.qcow2"
    subprocess.run(["qemu-img", "convert", "-q", "-f", art.disk_format, "-O", "qcow2", str(art.disk), str(disk)],
                   check=True, timeout=60)  # fmt: skip
    size = art.disk_size_bytes
    driver = QemuDriver(tmp / "run", tmp / "log", images_dir(), "tcg")
    exports = QsdExports()
    await driver.attach_all()
    res: dict[str, dict[str, list[float]]] = {c: {w: [] for w in WORKLOADS} for c in CONFIGS}
    try:
        spec = LaunchSpec(name=NAME, uuid="5eb1a5e0-0000-4000-8000-0000000000b1", vcpus=1, memory_mib=128,
                          image="tiny", disks=[LaunchDisk(id="disk0", path=str(disk))])  # fmt: skip
        await driver.start(spec)
        log = tmp / "log" / f"{NAME}.log"
        wait_line(log, READY, 120)
        await asyncio.sleep(1)
        console = Console(tmp / "run" / NAME / "serial.sock", log)
        for i in range(runs):
            order = CONFIGS[i % len(CONFIGS) :] + CONFIGS[: i % len(CONFIGS)]
            for config in order:
                replica = tmp / f"r{i}-{config}.qcow2"
                if config != "local":
                    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(replica), str(size)], check=True)
                    port = await exports.start(replica, "bench", "127.0.0.1", config.endswith("writethrough"))
                    t0 = time.monotonic()
                    st = await driver.attach_replica(NAME, "disk0", "127.0.0.1", port, "bench", timeout_s=60)
                    assert st.state == "in_sync", st
                    print(f"  round {i + 1} {config}: in sync {time.monotonic() - t0:.2f} s after attach", flush=True)
                for w, (cmd, amount, _) in WORKLOADS.items():
                    secs = await console.run(cmd)
                    res[config][w].append(amount / secs)
                    await console.run("rm -f /data/b; sync")
                if config != "local":
                    [st] = await driver.replica_status(NAME)
                    assert st.state == "in_sync", st  # it stayed in sync through the writes
                    await driver.detach_replica(NAME, "disk0")
                    await exports.stop(replica)
                    replica.unlink()
        await driver.stop(NAME)
    finally:
        await driver.close()
    return res


def main() -> None:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    ensure_image()
    tmp = Path(tempfile.mkdtemp(prefix="kasou-bench-repl-", dir="/tmp"))
    try:
        res = asyncio.run(bench(tmp, args.runs))
    finally:
        pids = []
        for d in Path("/proc").iterdir():
            with contextlib.suppress(OSError):
                if d.name.isdigit() and str(tmp) in (d / "cmdline").read_bytes().decode(errors="replace"):
                    pids.append(int(d.name))
        kill_pids([p for p in pids if p != os.getpid()])
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"\n{'':26}" + "".join(f"{c:>26}" for c in CONFIGS) + f"   (medians of {args.runs})")
    for w, (_, _, unit) in WORKLOADS.items():
        cells = "".join(f"{median(res[c][w]):19.1f} {unit:>6}" for c in CONFIGS)
        print(f"{w:26}{cells}")
    for c in CONFIGS[1:]:
        ratios = ", ".join(f"{w} {median(res[c][w]) / median(res['local'][w]):.2f}" for w in WORKLOADS)
        print(f"ratio {c}/local: {ratios}")


if __name__ == "__main__":
    main()
