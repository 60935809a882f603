"""Maintenance: time to empty a host of N running VMs by live migration, and the stops it caused.

All N VMs are put on h1 of a 3-host lab (h2 and h3 held in maintenance while
they are created), then ``kasou host maintenance h1`` moves them to h2 and h3.
Prints the wall time, the time per VM and the stops counted by the uptime
ledger (a migration is not a stop; the target is zero).

    .venv/bin/python bench/maintenance.py [--vms 10]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import KASOU, ensure_image, lab_env


def main() -> None:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so that the lab is taken down
    ap = argparse.ArgumentParser()
    ap.add_argument("--vms", type=int, default=10)
    args = ap.parse_args()
    ensure_image()
    lab_dir = Path(tempfile.mkdtemp(prefix="kasou-bench-lab-", dir="/tmp"))
    # 10 one-vCPU guests on one 2-CPU host: more than the default 4:1 vCPU overcommit allows.
    env = dict(os.environ, KASOU_LAB_DIR=str(lab_dir), KASOU_VCPU_RATIO="8")
    try:
        subprocess.run([*KASOU, "lab", "up", "--hosts", "3"], env=env, check=True, capture_output=True, timeout=180)
        env = lab_env(env, "h1")

        def kasou(*a: str) -> str:
            r = subprocess.run([*KASOU, *a], env=env, capture_output=True, text=True, timeout=1800)
            if r.returncode != 0:
                raise SystemExit(f"kasou {' '.join(a)}: {r.stderr.strip()}")
            return r.stdout

        for h in ("h2", "h3"):
            kasou("host", "maintenance", h)
        names = [f"v{i}" for i in range(args.vms)]
        for n in names:
            kasou("vm", "create", n, "--image", "tiny", "--shared", "--start")
        for h in ("h2", "h3"):
            kasou("host", "maintenance", h, "--off")
        deadline = time.monotonic() + 300
        while not all(v["guest_ready"] for v in json.loads(kasou("vm", "list", "--json"))):
            if time.monotonic() > deadline:
                raise SystemExit("guests not ready in 300 s")
            time.sleep(1)
        assert all(v["host"] == "h1" for v in json.loads(kasou("vm", "list", "--json")))
        t0 = time.monotonic()
        kasou("host", "maintenance", "h1")
        took = time.monotonic() - t0
        vms = json.loads(kasou("vm", "list", "--json"))
        report = json.loads(kasou("report", "uptime", "--json"))
        stops = sum(r["stops"] for r in report)
        moved = sum(1 for v in vms if v["host"] != "h1")
        print(f"emptied h1 of {args.vms} running VMs in {took:.1f} s ({took / args.vms:.1f} s per VM); "
              f"moved {moved}, stops in the ledger: {stops}, all running: {all(v['state'] == 'running' for v in vms)}")  # fmt: skip
    finally:
        subprocess.run([*KASOU, "lab", "down"], env=env, capture_output=True, timeout=180)
        shutil.rmtree(lab_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
