"""Bulk start after a power loss on the 3-host lab: the hospital's 33 servers as replicated HA VMs.

``kasou lab up --hosts 3``; N tiny VMs (128 MiB, one vCPU) made with ``--replicated --ha --onboot`` in three
start-up groups (orders 1, 2, 3: a third each, as the sample hospital's 24-hour clinical, business-hours and
batch systems) and HA priorities 90, 50, 10. Every mode starts all of them, stopped, and is timed from its first
command until every guest's serial console shows its readiness line (read from the hosts' log files: nothing
asks kasou, whose CPU it would take):

- ``bulk``: one ``kasou vm start --all`` (one job: start-up order, in parallel within each host's limit);
- ``serial`` (``--serial``): ``kasou vm start NAME`` one after another, as a script would (each call waits
  for its VM's start job: admission, the replica's set-up, QEMU started);
- ``bare``: N bare QEMUs of the same guest and command line on local disks, spawned together on the machine
  (``bench/bulk_start.py``'s baseline): no placement, no replica, no HA.

For the kasou modes it also records when every replica was in sync (the API asked every 2 s once the guests
are ready), the VMs' start jobs (median and longest span), and where the machine's CPU went during the
round: the guests' QEMUs, the replicas' storage daemons, kasou's services (agents, APIs, the CLI) and etcd,
from /proc of the processes alive at the end (the share of the machine's busy time they account for is
printed). Between rounds every VM is stopped (``kasou vm stop --all``, not timed).

    flock /tmp/kasou-qemu.lock .venv/bin/python bench/bulk_start_lab.py [--vms 33] [--rounds 1] [--serial]
        [--out bench/results/bulk_start_lab.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import KASOU, READY, ensure_image, images_dir, interleave, lab_env, median
from bulk_start import Bare
from kasou.api.client import Client
from kasou.config import api_url
from kasou.hypervisor.qemu.accel import decide

HOSTS = ["h1", "h2", "h3"]
TIMEOUT = 1800.0  # one round, to every guest ready (the serial mode took ~16 minutes when the issue was filed)
GROUPS = [(1, 90), (2, 50), (3, 10)]  # (start-up order, HA priority) of each third of the VMs
TICK = os.sysconf("SC_CLK_TCK")


def busy_ticks() -> int:
    """The machine's busy CPU ticks so far (all cores; idle and iowait excluded)."""
    f = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return sum(f) - f[3] - f[4]


def kind(pid: str, lab_dir: str) -> str | None:
    """What a process is to this bench: guest, replica, kasou, etcd, or None (not the lab's)."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return None
    exe = os.path.basename(argv[0].decode(errors="replace"))
    line = b" ".join(argv).decode(errors="replace")
    if exe.startswith("qemu-system"):
        return "guests" if lab_dir in line else None
    if exe in ("qemu-storage-daemon", "qemu-nbd"):
        return "replicas" if lab_dir in line else None
    if exe == "etcd":
        return "etcd" if lab_dir in line else None
    if "kasou" in line and "python" in exe:
        return "kasou"
    return None


def cpu_by_kind(lab_dir: str) -> dict[str, int]:
    """CPU ticks used so far by the lab's processes alive now, by kind (a process's own and its reaped
    children's)."""
    out: dict[str, int] = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or (k := kind(d.name, lab_dir)) is None:
            continue
        try:
            f = (d / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out[k] = out.get(k, 0) + sum(int(x) for x in f[11:15])  # utime stime cutime cstime
    return out


class LabRun:
    def __init__(self, lab_dir: Path, names: list[str]) -> None:
        self.dir = lab_dir
        self.names = names
        self.base = dict(os.environ, KASOU_LAB_DIR=str(lab_dir))
        self.env = lab_env(self.base, "h1")
        trust = ssl.create_default_context(cafile=self.env["KASOU_CA"])
        self.api = Client(api_url(self.env["KASOU_API"]), self.env["KASOU_TOKEN"], timeout=30, verify=trust)
        self.detail: dict[str, list[dict[str, Any]]] = {"bulk": [], "serial": []}

    def kasou(self, *argv: str, timeout: float = TIMEOUT) -> str:
        r = subprocess.run([*KASOU, *argv], env=self.env, capture_output=True, text=True, timeout=timeout)
        if r.returncode != 0:
            raise SystemExit(f"kasou {' '.join(argv)} failed ({r.returncode}):\n{r.stdout.strip()}\n{r.stderr.strip()}")
        return r.stdout

    def logs(self, name: str) -> list[Path]:
        return [self.dir / h / "home" / "log" / "serial" / f"{name}.log" for h in HOSTS]

    def clear_logs(self) -> None:
        for n in self.names:
            for p in self.logs(n):
                if p.exists():
                    p.write_bytes(b"")

    def ready(self, name: str) -> bool:
        for p in self.logs(name):
            try:
                if READY.encode() in p.read_bytes():
                    return True
            except FileNotFoundError:
                pass
        return False

    def round(self, key: str, argvs: list[list[str]]) -> float:
        since = time.time()
        self.clear_logs()
        cpu0, busy0 = cpu_by_kind(str(self.dir)), busy_ticks()
        t0 = time.monotonic()
        for argv in argvs:
            self.kasou(*argv)
        calls = time.monotonic() - t0
        waiting = set(self.names)
        deadline = t0 + TIMEOUT
        while waiting and time.monotonic() < deadline:
            waiting = {n for n in waiting if not self.ready(n)}
            time.sleep(0.1)
        if waiting:
            raise SystemExit(f"{key}: not every guest ready within {TIMEOUT:.0f} s: {sorted(waiting)}")
        ready = time.monotonic() - t0
        cpu1, busy1 = cpu_by_kind(str(self.dir)), busy_ticks()
        while time.monotonic() < deadline:
            vms = self.api.get("/v1/vms")
            if all((v.get("replica") or {}).get("state") == "in_sync" for v in vms):
                break
            time.sleep(2)
        in_sync = time.monotonic() - t0
        jobs = [j for j in self.api.get("/v1/jobs", params={"limit": 1000})
                if j["kind"] == "start" and j["created_at"] >= since and j.get("finished_at")]  # fmt: skip
        spans = [j["finished_at"] - j["started_at"] for j in jobs]
        vms = self.api.get("/v1/vms")
        used = {k: round((cpu1.get(k, 0) - cpu0.get(k, 0)) / TICK, 1) for k in sorted(cpu1)}
        busy = (busy1 - busy0) / TICK
        r = {
            "calls_s": round(calls, 1),
            "ready_s": round(ready, 1),
            "replicas_in_sync_s": round(in_sync, 1),
            "start_jobs": len(spans),
            "start_job_median_s": round(median(spans), 2),
            "start_job_max_s": round(max(spans, default=0), 2),
            "per_host": {h: sum(1 for v in vms if v["host"] == h) for h in HOSTS},
            "cpu_s": used,
            "machine_busy_s": round(busy, 1),
            "cpu_accounted": round(sum(used.values()) / busy, 2) if busy else None,
        }
        self.detail[key].append(r)
        print(f"{key}: {json.dumps(r)}", flush=True)
        self.kasou("vm", "stop", "--all")
        return ready


def create(run: LabRun, n: int) -> None:
    for i, name in enumerate(run.names):
        order, prio = GROUPS[i * len(GROUPS) // n]
        argv = ["vm", "create", name, "--image", "tiny", "--memory", "128", "--replicated", "--ha",
                "--priority", str(prio), "--onboot", "--order", str(order), "--tag", "bench"]  # fmt: skip
        for attempt in range(30):  # a lab just up may not have every agent registered yet
            r = subprocess.run([*KASOU, *argv], env=run.env, capture_output=True, text=True, timeout=300)
            if r.returncode == 0:
                break
            if "no host agent answers" not in r.stderr or attempt == 29:
                raise SystemExit(f"kasou {' '.join(argv)}: {r.stderr.strip()}")
            time.sleep(1)


def main() -> None:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so that the lab is taken down
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vms", type=int, default=33)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--serial", action="store_true", help="also start them one CLI call at a time")
    ap.add_argument("--out", default="bench/results/bulk_start_lab.json")
    args = ap.parse_args()
    ensure_image()
    # N one-vCPU guests over 3 hosts that each report this machine's cores, with room kept for one host's HA VMs
    # on the hosts of their replicas (half of them on each other host): allow what that needs (the hosts share
    # one machine; admission would otherwise refuse the last VMs, naming the vCPUs)
    per_host = -(-args.vms // len(HOSTS))
    os.environ.setdefault(
        "KASOU_VCPU_RATIO", str(max(4, -(-(per_host + -(-per_host // 2)) // (os.cpu_count() or 1)) + 1))
    )
    accel = asyncio.run(decide(images_dir())).accelerator
    lab_dir = Path(tempfile.mkdtemp(prefix="kasou-bench-lab-", dir="/tmp"))
    names = [f"s{i:02d}" for i in range(args.vms)]
    bare = Bare(args.vms, accel)
    t_up = time.monotonic()
    try:
        subprocess.run([*KASOU, "lab", "up", "--hosts", str(len(HOSTS))], env=dict(os.environ, KASOU_LAB_DIR=str(lab_dir)),
                       check=True, capture_output=True, timeout=300)  # fmt: skip
        run = LabRun(lab_dir, names)
        create(run, args.vms)
        print(f"lab up and {args.vms} VMs made in {time.monotonic() - t_up:.0f} s", flush=True)
        runners = {
            "bulk": lambda _i: run.round("bulk", [["vm", "start", "--all"]]),
            "bare": bare.run,
        }
        if args.serial:
            runners["serial"] = lambda _i: run.round("serial", [["vm", "start", n] for n in names])
        times = interleave(args.rounds, runners)
        detail = run.detail
    except BaseException:
        keep = Path(tempfile.mkdtemp(prefix="kasou-bench-lab-logs-", dir="/tmp"))
        for log in [*lab_dir.glob("*/log/*.log"), *lab_dir.glob("*/home/log/*.log"), *lab_dir.glob("etcd/*.log")]:
            host = next(p.name for p in log.parents if p.parent == lab_dir)  # the services' logs, not the consoles
            shutil.copy(log, keep / f"{host}-{log.name}")
        print(f"the lab's service logs are kept in {keep}", flush=True)
        raise
    finally:
        bare.close()
        subprocess.run([*KASOU, "lab", "down"], env=dict(os.environ, KASOU_LAB_DIR=str(lab_dir)),
                       capture_output=True, timeout=300)  # fmt: skip
        shutil.rmtree(lab_dir, ignore_errors=True)
    med = {k: round(median(v), 1) for k, v in times.items()}
    ratios = {"bulk_over_bare": round(med["bulk"] / med["bare"], 2)}
    if "serial" in med:
        ratios["serial_over_bulk"] = round(med["serial"] / med["bulk"], 2)
    print(f"{args.vms} VMs on {len(HOSTS)} lab hosts, all guests ready (median of {args.rounds}): "
          + ", ".join(f"{k} {v} s" for k, v in med.items()))  # fmt: skip
    print("ratios: " + ", ".join(f"{k} {v}" for k, v in ratios.items()))
    result = {
        "command": "python bench/bulk_start_lab.py " + " ".join(sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d"),
        "vms": args.vms,
        "hosts": len(HOSTS),
        "cores": os.cpu_count(),
        "accelerator": accel,
        "vcpu_ratio": os.environ["KASOU_VCPU_RATIO"],
        "ready_s": med,
        "ratios": ratios,
        "rounds": {k: v for k, v in detail.items() if v},
        "bare_ready_s": times["bare"],
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
