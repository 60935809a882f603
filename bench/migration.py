"""Live migration: kasou (the whole stack on a 3-host lab) vs a bare QMP ``migrate``, side by side.

For an idle 128 MiB tiny guest and for one that dirties memory (a loop writing
32 MiB in its RAM, typed on its serial console), prints QEMU's reported downtime
and the total time, medians over --runs, and the ratio kasou/bare. Then a guest
on a local disk (copied with the memory) and one on a mirrored disk (copied, and
a new second copy filled on the new host before the job ends): the CLI's wall
time and the ratio mirrored/local.

    .venv/bin/python bench/migration.py [--runs 5]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from qemu.qmp import QMPClient

from _common import KASOU, READY, ensure_image, images_dir, kill_pids, lab_env, median, qemu_pids, wait_line
from kasou.hypervisor.base import LaunchDisk, LaunchSpec
from kasou.hypervisor.qemu.cmdline import BootFiles, RuntimeFiles, build_argv
from kasou.image import load_image

DIRTY = "while true; do dd if=/dev/zero of=/tmp/dirty bs=1M count=32 2>/dev/null; done &\n"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def type_on_serial(sock: Path, text: str) -> None:
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(5)
        s.connect(str(sock))
        s.sendall(text.encode())
        time.sleep(0.3)


async def bare_once(tmp: Path, i: int, dirty: bool) -> tuple[float, float]:
    art = load_image(images_dir(), "tiny")
    boot = BootFiles(art.kernel, art.initrd, art.kernel_args)
    disk = tmp / f"d{i}.qcow2"
    subprocess.run(
        ["qemu-img", "convert", "-q", "-f", art.disk_format, "-O", "qcow2", str(art.disk), str(disk)], check=True
    )
    spec = LaunchSpec(name=f"bm{i}", uuid=str(uuid.uuid4()), vcpus=1, memory_mib=128, image="tiny",
                      disks=[LaunchDisk(id="disk0", path=str(disk))])  # fmt: skip
    fa = RuntimeFiles(tmp / f"a{i}", tmp / f"a{i}.log")
    fb = RuntimeFiles(tmp / f"b{i}", tmp / f"b{i}.log")
    fa.dir.mkdir()
    fb.dir.mkdir()
    subprocess.run([*build_argv(spec, fa, "tcg", boot), "-daemonize"], check=True)  # by hand: daemonized
    wait_line(fa.serial_log, READY, 120)
    if dirty:
        type_on_serial(fa.serial, DIRTY)
    port = free_port()
    subprocess.run([*build_argv(spec, fb, "tcg", boot), "-incoming", f"tcp:127.0.0.1:{port}", "-daemonize"], check=True)
    qa = QMPClient("a")
    await qa.connect(str(fa.qmp))
    await qa.execute("migrate-set-parameters", {"downtime-limit": 100})
    t0 = time.monotonic()
    await qa.execute("migrate", {"uri": f"tcp:127.0.0.1:{port}"})
    while True:
        st = await qa.execute("query-migrate")
        if st.get("status") == "completed":
            break
        if st.get("status") in ("failed", "cancelled"):
            raise RuntimeError(f"bare migration {st}")
        await asyncio.sleep(0.01)
    total = time.monotonic() - t0
    await qa.disconnect()
    kill_pids(qemu_pids(str(tmp)))
    return float(st.get("downtime", 0)), total * 1000


def main() -> None:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so that the lab is taken down
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    ensure_image()
    lab_dir = Path(tempfile.mkdtemp(prefix="kasou-bench-lab-", dir="/tmp"))
    env = dict(os.environ, KASOU_LAB_DIR=str(lab_dir))
    tmp = Path(tempfile.mkdtemp(prefix="kasou-bench-mig-", dir="/tmp"))
    res: dict[str, list[tuple[float, float]]] = {}
    try:
        subprocess.run([*KASOU, "lab", "up", "--hosts", "2"], env=env, check=True, capture_output=True, timeout=180)
        env = lab_env(env, "h1")

        def kasou(*a: str) -> str:
            return subprocess.run([*KASOU, *a], env=env, capture_output=True, text=True, check=True, timeout=600).stdout

        for dirty in (False, True):
            label = "dirtying" if dirty else "idle"
            kasou("vm", "create", "m", "--image", "tiny", "--shared", "--start")
            host = json.loads(kasou("vm", "show", "m", "--json"))["host"]
            wait_line(lab_dir / host / "home" / "log" / "serial" / "m.log", READY, 120)
            if dirty:
                sock = next(Path("/run/kasou").rglob("m/serial.sock"), None) or next(lab_dir.rglob("m/serial.sock"))
                type_on_serial(sock, DIRTY)
            for i in range(args.runs):
                t0 = time.monotonic()
                kasou("vm", "migrate", "m")
                wall = (time.monotonic() - t0) * 1000
                job = json.loads(kasou("job", "list", "--vm", "m", "--json"))[-1]
                r = job["result"]
                res.setdefault(f"kasou {label}", []).append((float(r["downtime_ms"]), float(r["total_ms"])))
                res.setdefault(f"kasou {label} (CLI wall)", []).append((float(r["downtime_ms"]), wall))
                res.setdefault(f"bare {label}", []).append(
                    asyncio.run(bare_once(tmp, i + (100 if dirty else 0), dirty))
                )
            kasou("vm", "delete", "m", "--force")
        # Local disks: copied with the memory; a mirrored disk also gets a new second copy on the new host.
        for pool in ("ma", "mb"):
            kasou("pool", "create", pool, "--path", str(lab_dir / f"pool-{pool}"))
        for label, extra in (("local disk", []), ("mirrored disk", ["--mirror", "ma,mb"])):
            kasou("vm", "create", "d", "--image", "tiny", *extra, "--start")
            host = json.loads(kasou("vm", "show", "d", "--json"))["host"]
            wait_line(lab_dir / host / "home" / "log" / "serial" / "d.log", READY, 120)
            for _ in range(args.runs):
                t0 = time.monotonic()
                kasou("vm", "migrate", "d")
                wall = (time.monotonic() - t0) * 1000
                v = json.loads(kasou("vm", "show", "d", "--json"))
                mirror = v["disks"][0]["mirror"]
                assert mirror is None or mirror["state"] == "in_sync", mirror  # back in sync when the job ends
                r = json.loads(kasou("job", "list", "--vm", "d", "--json"))[-1]["result"]
                res.setdefault(f"kasou {label} (CLI wall)", []).append((float(r["downtime_ms"]), wall))
            kasou("vm", "delete", "d", "--force")
        print(f"{'':28}{'downtime ms':>12}{'total ms':>10}   (medians of {args.runs})")
        for k, xs in res.items():
            print(f"{k:28}{median([x[0] for x in xs]):12.1f}{median([x[1] for x in xs]):10.1f}")
        for label in ("idle", "dirtying"):
            k, b = res[f"kasou {label}"], res[f"bare {label}"]
            print(f"ratio kasou/bare total ({label}): {median([x[1] for x in k]) / median([x[1] for x in b]):.2f}")
        m, loc = res["kasou mirrored disk (CLI wall)"], res["kasou local disk (CLI wall)"]
        print(
            f"ratio mirrored/local disk, CLI wall (the mirrored one includes filling the new second copy): "
            f"{median([x[1] for x in m]) / median([x[1] for x in loc]):.2f}"
        )
    finally:
        subprocess.run([*KASOU, "lab", "down"], env=env, capture_output=True, timeout=180)
        kill_pids(qemu_pids(str(tmp)))
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(lab_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
