"""Bulk start after a power loss: N tiny VMs on one host, started one CLI call at a time vs one
``kasou vm start --all`` (parallel within the host's limits), vs N bare QEMUs started together.

Each mode is timed from its first command to the moment every guest is ready (kasou: ``guest_ready``
from the guest's heartbeat, polled through the API every 0.25 s; bare: the readiness line on each
serial console). Between rounds every VM is stopped again (``kasou vm stop --all``, not timed).

    flock /tmp/kasou-qemu.lock .venv/bin/python bench/bulk_start.py [--vms 8] [--rounds 1]
        [--out bench/results/bulk_start.json]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (
    KASOU,
    READY,
    ensure_image,
    images_dir,
    interleave,
    kasou_env,
    kill_pids,
    median,
    qemu_pids,
    wait_line,
)
from kasou.api.client import Client
from kasou.hypervisor.base import LaunchDisk, LaunchSpec
from kasou.hypervisor.qemu.accel import decide
from kasou.hypervisor.qemu.cmdline import BootFiles, RuntimeFiles, build_argv
from kasou.image import load_image

TIMEOUT = 300.0


def clear_logs(serial: Path, names: list[str]) -> None:
    """Empty the stopped VMs' serial logs (QEMU truncates its log when it opens it, which is after a round's
    clock starts: an old readiness line must not count)."""
    for n in names:
        p = serial / f"{n}.log"
        if p.exists():
            p.write_bytes(b"")


def wait_all_ready(serial: Path, names: list[str], t0: float) -> float:
    """Seconds from ``t0`` until every VM's serial console (``serial``/NAME.log) shows the readiness line (read as
    the bare QEMUs' logs are: nothing asks kasou, whose CPU it would take)."""
    deadline = time.monotonic() + TIMEOUT
    waiting = set(names)
    while time.monotonic() < deadline:
        for n in list(waiting):
            try:
                if READY.encode() in (serial / f"{n}.log").read_bytes():
                    waiting.discard(n)
            except FileNotFoundError:
                pass
        if not waiting:
            return time.monotonic() - t0
        time.sleep(0.05)
    raise RuntimeError(f"not every guest was ready within {TIMEOUT:.0f} s: {sorted(waiting)}")


def stop_all(c: Client) -> None:
    res = c.post("/v1/vms/actions/stop", json={"all": True})
    job = c.wait_job(res["job"]["id"], 300)
    if job["state"] != "succeeded":
        raise RuntimeError(f"stop --all: {job}")


def kasou_mode(
    c: Client, env: dict[str, str], serial: Path, names: list[str], argvs: list[list[str]]
) -> dict[str, float]:
    """Run the CLI commands one after the other; time them, the guests' readiness, and the VMs' own start jobs
    (admission and QEMU's start through the agent: the control plane's part of each start)."""
    since = time.time()
    clear_logs(serial, names)
    t0 = time.monotonic()
    for argv in argvs:
        r = subprocess.run([*KASOU, *argv], env=env, timeout=TIMEOUT, capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"kasou {' '.join(argv)} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")
    calls = time.monotonic() - t0
    ready = wait_all_ready(serial, names, t0)
    jobs = [j for j in c.get("/v1/jobs", params={"limit": 1000}) if j["kind"] == "start" and j["created_at"] >= since]
    spans = [j["finished_at"] - j["started_at"] for j in jobs if j.get("finished_at")]
    stop_all(c)
    return {
        "calls_s": round(calls, 2),
        "ready_s": round(ready, 2),
        "start_jobs": len(spans),
        "start_job_median_s": round(median(spans), 2),
        "start_job_max_s": round(max(spans, default=0), 2),
    }


SHARED_CGROUP = Path("/sys/fs/cgroup/cpu/kasou-bench-bare")  # cgroup v1 (as here); on v2 not made


class Bare:
    """The QEMU command line kasou builds, N of them spawned together with -daemonize (not confined). With
    ``shared_cgroup``, all of them in one CPU cgroup of the default weight, as kasou's confined QEMUs are (each in
    its own cgroup under one ``kasou`` parent): together they weigh as much as one process outside it."""

    def __init__(self, n: int, accelerator: str, shared_cgroup: bool = False) -> None:
        self.n = n
        self.cgroup = SHARED_CGROUP if shared_cgroup and SHARED_CGROUP.parent.is_dir() else None
        self.art = load_image(images_dir(), "tiny")
        self.accel = accelerator
        self.dir = Path(tempfile.mkdtemp(prefix="kasou-bulk-bare-", dir="/tmp"))

    def run(self, _i: int) -> float:
        argvs, logs = [], []
        for k in range(self.n):
            name = f"bare{k}"
            disk = self.dir / f"{name}.qcow2"
            fmt = self.art.disk_format
            subprocess.run(["qemu-img", "convert", "-q", "-f", fmt, "-O", "qcow2", str(self.art.disk), str(disk)],
                           check=True)  # fmt: skip
            files = RuntimeFiles(dir=self.dir / name, serial_log=self.dir / f"{name}.log")
            files.dir.mkdir()
            spec = LaunchSpec(name=name, uuid=str(uuid.uuid4()), vcpus=1, memory_mib=128, image="tiny",
                              disks=[LaunchDisk(id="disk0", path=str(disk))])  # fmt: skip
            boot = BootFiles(self.art.kernel, self.art.initrd, self.art.kernel_args)
            argvs.append([*build_argv(spec, files, self.accel, boot), "-daemonize"])
            logs.append(files.serial_log)
        t0 = time.monotonic()
        if self.cgroup is not None:
            self.cgroup.mkdir(exist_ok=True)
            into = f'echo $$ > {self.cgroup}/cgroup.procs && exec "$@"'
            argvs = [["sh", "-c", into, "sh", *a] for a in argvs]
        procs = [subprocess.Popen(a, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for a in argvs]
        for p in procs:
            p.wait(timeout=60)
        last = max(wait_line(log, READY, TIMEOUT) for log in logs)
        self.cleanup()
        return last - t0

    def cleanup(self) -> None:
        kill_pids(qemu_pids(str(self.dir)))
        for p in self.dir.iterdir():
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)

    def close(self) -> None:
        kill_pids(qemu_pids(str(self.dir)))
        shutil.rmtree(self.dir, ignore_errors=True)
        if self.cgroup is not None:
            with contextlib.suppress(OSError):
                time.sleep(0.5)
                self.cgroup.rmdir()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vms", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--out", default="bench/results/bulk_start.json")
    args = ap.parse_args()
    ensure_image()
    # 8 one-vCPU guests on a 2-core host reach the default 4:1 vCPU overcommit: allow what is asked.
    os.environ.setdefault("KASOU_VCPU_RATIO", str(max(4, -(-args.vms // (os.cpu_count() or 1)))))
    accel = asyncio.run(decide(images_dir())).accelerator
    names = [f"b{i}" for i in range(args.vms)]
    bare = Bare(args.vms, accel)
    bare_cg = Bare(args.vms, accel, shared_cgroup=True)
    try:
        with kasou_env() as (paths, c, env):
            serial = paths.logs / "serial"
            for n in names:
                res = c.post("/v1/vms", json={"name": n, "image": "tiny", "memory_mib": 128, "tags": ["bench"]})
                c.wait_job(res["job"]["id"], 120)
            cpus = c.get("/v1/hosts")[0].get("cpus")
            detail: dict[str, list[dict[str, float]]] = {"serial": [], "bulk": [], "bulk_all_at_once": []}

            def mode(key: str, argvs: list[list[str]]) -> Any:
                def run(_i: int) -> float:
                    r = kasou_mode(c, env, serial, names, argvs)
                    detail[key].append(r)
                    print(f"{key}: {r}", flush=True)
                    return r["ready_s"]

                return run

            times = interleave(args.rounds, {
                "serial": mode("serial", [["vm", "start", n] for n in names]),
                "bulk": mode("bulk", [["vm", "start", "--all"]]),
                "bulk_all_at_once": mode("bulk_all_at_once", [["vm", "start", "--all", "--parallel", str(args.vms)]]),
                "bare": bare.run,
                **({"bare_one_cgroup": bare_cg.run} if bare_cg.cgroup is not None else {}),
            })  # fmt: skip
    finally:
        bare.close()
        bare_cg.close()
    med = {k: round(median(v), 2) for k, v in times.items()}
    ratios = {
        "serial_over_bulk": round(med["serial"] / med["bulk"], 2),
        "bulk_over_bare": round(med["bulk"] / med["bare"], 2),
        "bulk_all_at_once_over_bare": round(med["bulk_all_at_once"] / med["bare"], 2),
        "serial_over_bare": round(med["serial"] / med["bare"], 2),
    }
    if "bare_one_cgroup" in med:
        ratios["bulk_over_bare_one_cgroup"] = round(med["bulk"] / med["bare_one_cgroup"], 2)
    print(
        f"{args.vms} VMs, all guests ready (median of {args.rounds}): "
        + ", ".join(f"{k} {v} s" for k, v in med.items())
    )
    print("ratios: " + ", ".join(f"{k} {v}" for k, v in ratios.items()))
    result = {
        "command": "python bench/bulk_start.py " + " ".join(sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d"),
        "vms": args.vms,
        "cores": os.cpu_count(),
        "host_cpus": cpus,
        "accelerator": accel,
        "load_average_1m": round(os.getloadavg()[0], 2),
        "ready_s": med,
        "ratios": ratios,
        "rounds": {k: v for k, v in detail.items()},
        "bare_ready_s": times["bare"],
        "bare_one_cgroup_ready_s": times.get("bare_one_cgroup"),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
