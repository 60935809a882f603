"""HA failover on a 3-host lab: the host of an HA guest is killed (power loss), again and again.

For each kill: the time from the kill to the guest's readiness line on another
host, split into detection (until the control plane sees the host's lease record
gone: TTL less the part of a renewal period already gone), fence wait (until the
restart job starts: the fence margin and the reconcile tick) and boot (QEMU start
and the guest's boot, until ``KASOU-READY``). Every run also checks
that no acknowledged write was lost (``recovered N`` >= the last ``seq N``
before the kill) and that no two QEMUs of the guest ever ran at once.
Default HA timeouts. Prints each run, then the medians and the worst, and records them in
``bench/results/failover.json`` (``--out``), which the planner's availability model reads
(kasou.planner.availability: the median of detection + fence wait).

    .venv/bin/python bench/failover.py [--runs 10] [--out bench/results/failover.json]
"""

# ruff: noqa: B023 - the lambdas are awaited at once, inside the loop

from __future__ import annotations

import argparse
import datetime
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

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import KASOU, READY, ensure_image, lab_env, median
from kasou.api.client import Client
from kasou.config import HaTimes, api_url
from kasou.lab.watch import DoubleRunWatch

VM = "emr"
RESULT = Path(__file__).resolve().parent / "results" / "failover.json"


def commit() -> str | None:
    r = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).resolve().parent,
                       capture_output=True, text=True, timeout=10)  # fmt: skip
    return (r.stdout.strip() or None) if r.returncode == 0 else None


def record(out: Path, rows: list[dict[str, float]], lost: int, doubles: int, accelerators: list[str]) -> None:
    """The run's figures as JSON (seconds), for bench/README.md and the planner's availability model."""
    keys = ("total", "detect", "fence_wait", "boot", "to_restart")
    result = {
        "bench": "bench/failover.py",
        "what": "an HA guest's host killed (power loss) on a 3-host lab; seconds from the kill: detect (the "
        "control plane sees the host's lease gone), fence_wait (until the restart job starts), boot (QEMU "
        "start and the tiny guest's boot to its readiness line), to_restart = detect + fence_wait",
        "recorded": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "commit": commit(),
        "accelerator": ",".join(sorted(set(accelerators))) or None,
        "ha_times": {"lease_ttl_s": HaTimes().lease_ttl_s, "fence_margin_s": HaTimes().fence_margin_s},
        "kills": len(rows),
        "median_s": {k: round(median([r[k] for r in rows]), 2) for k in keys},
        "worst_s": {k: round(max(r[k] for r in rows), 2) for k in keys},
        "runs": [{k: round(r[k], 2) for k in keys} for r in rows],
        "lost_writes": lost,
        "double_runs": doubles,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"recorded in {out}")


def serial(lab_dir: Path, host: str) -> list[str]:
    try:
        return (lab_dir / host / "home" / "log" / "serial" / f"{VM}.log").read_text(errors="replace").splitlines()
    except FileNotFoundError:
        return []


def log_size(lab_dir: Path, host: str) -> int:
    try:
        return (lab_dir / host / "home" / "log" / "serial" / f"{VM}.log").stat().st_size
    except FileNotFoundError:
        return 0


def new_text(lab_dir: Path, host: str, offset: int) -> str:
    """What the guest printed on ``host`` since the log had ``offset`` bytes (QEMU truncates it at start)."""
    try:
        data = (lab_dir / host / "home" / "log" / "serial" / f"{VM}.log").read_bytes()
    except FileNotFoundError:
        return ""
    return data[offset if len(data) >= offset else 0 :].decode(errors="replace")


def last_value(lab_dir: Path, host: str, prefix: str) -> int:
    vals = [int(ln.split()[1]) for ln in serial(lab_dir, host) if ln.startswith(prefix) and len(ln.split()) > 1]
    return vals[-1] if vals else -1


def wait(what: str, cond, timeout: float = 180, every: float = 0.05):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while True:
        v = cond()
        if v:
            return v
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(every)


def main() -> None:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so that the lab is taken down
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--out", type=Path, default=RESULT, help="where to record the result (JSON)")
    args = ap.parse_args()
    ensure_image()
    lab_dir = Path(tempfile.mkdtemp(prefix="kasou-bench-lab-", dir="/tmp"))
    base = dict(os.environ, KASOU_LAB_DIR=str(lab_dir))
    hosts = ["h1", "h2", "h3"]
    rows: list[dict[str, float]] = []
    accelerators: list[str] = []
    lost = 0
    doubles = 0
    try:
        subprocess.run([*KASOU, "lab", "up", "--hosts", "3"], env=base, check=True, capture_output=True, timeout=180)

        def client(via: str) -> Client:
            env = lab_env(base, via)
            trust = ssl.create_default_context(cafile=env["KASOU_CA"])  # the lab's APIs are HTTPS (its own CA)
            return Client(api_url(env["KASOU_API"]), env["KASOU_TOKEN"], timeout=10, verify=trust)

        def kasou(via: str, *a: str) -> str:
            r = subprocess.run([*KASOU, *a], env=lab_env(base, via), capture_output=True, text=True, timeout=600)
            if r.returncode != 0:
                raise SystemExit(f"kasou {' '.join(a)}: {r.stderr.strip()}")
            return r.stdout

        for attempt in range(30):  # a lab just up may not have every agent registered yet
            r = subprocess.run([*KASOU, "vm", "create", VM, "--image", "tiny", "--shared", "--ha", "--start"],
                               env=lab_env(base, "h1"), capture_output=True, text=True, timeout=600)  # fmt: skip
            if r.returncode == 0:
                break
            if "no host agent answers" not in r.stderr or attempt == 29:
                raise SystemExit(f"kasou vm create: {r.stderr.strip()}")
            time.sleep(1)
        accelerators += [str(h.get("accelerator")) for h in client("h1").get("/v1/hosts") if h.get("accelerator")]
        for i in range(args.runs):
            leader = json.loads(kasou("h1", "cluster", "--json"))["leader"]
            api = client(leader)  # the leader's host is never the one killed: this measures a host failure
            vm = wait("the guest ready", lambda: (v := api.get(f"/v1/vms/{VM}"))["guest_ready"] and v)
            victim = vm["host"]
            if victim == leader:
                victim = next(h for h in hosts if h != leader)
                kasou(leader, "vm", "migrate", VM, "--to", victim)
            seq0 = last_value(lab_dir, victim, "seq ")
            wait("fresh writes", lambda: last_value(lab_dir, victim, "seq ") >= seq0 + 3, timeout=60)
            sizes = {h: log_size(lab_dir, h) for h in hosts}
            with DoubleRunWatch([VM]) as watch:
                t_kill = time.time()
                subprocess.run([*KASOU, "lab", "kill", victim], env=base, check=True, capture_output=True, timeout=60)
                last_seq = last_value(lab_dir, victim, "seq ")
                t_detect = t_restart = None
                failed_jobs: set[str] = set()
                new_host = None
                deadline = time.monotonic() + 180
                while time.monotonic() < deadline:
                    if t_restart is None:
                        jobs = [j for j in api.get("/v1/jobs", params={"vm": VM}) if j["kind"] == "ha-restart"]
                        since = [j for j in jobs if (j.get("started_at") or 0) > t_kill]
                        for j in since:
                            if j.get("state") == "failed" and j["id"] not in failed_jobs:
                                failed_jobs.add(j["id"])
                                print(f"  an ha-restart job failed: {j.get('error')}", flush=True)
                        fresh = [j for j in since if (j.get("result") or {}).get("detected_at")]
                        if fresh:
                            t_restart = fresh[-1]["started_at"]
                            t_detect = fresh[-1]["result"]["detected_at"]  # the control plane saw the lease gone
                    if new_host is None:
                        h = api.get(f"/v1/vms/{VM}")["host"]
                        new_host = h if h != victim else None
                    if new_host is not None and READY in new_text(lab_dir, new_host, sizes[new_host]):
                        t_ready = time.time()
                        break
                    time.sleep(0.02)
                else:
                    raise SystemExit("the guest did not come back within 180 s")
            assert new_host is not None
            t_detect = t_detect or t_restart or t_ready
            t_restart = t_restart or t_ready
            rec_lines = [
                ln for ln in new_text(lab_dir, new_host, sizes[new_host]).splitlines() if ln.startswith("recovered ")
            ]
            recovered = int(rec_lines[-1].split()[1]) if rec_lines else -1
            ok = recovered >= last_seq
            lost += not ok
            doubles += len(watch.doubles)
            row = {
                "total": t_ready - t_kill,
                "detect": t_detect - t_kill,
                "fence_wait": t_restart - t_detect,
                "boot": t_ready - t_restart,
                "to_restart": t_restart - t_kill,
            }
            rows.append(row)
            print(
                f"run {i + 1:2}: {victim} killed -> {new_host}: ready after {row['total']:5.1f} s "
                f"(detect {row['detect']:4.1f}, fence wait {row['fence_wait']:4.1f}, boot {row['boot']:4.1f}); "
                f"last seq {last_seq}, recovered {recovered}{'' if ok else '  LOST WRITES'}; "
                f"double runs seen: {len(watch.doubles)} in {watch.samples} samples",
                flush=True,
            )
            subprocess.run([*KASOU, "lab", "revive", victim], env=base, check=True, capture_output=True, timeout=180)
            wait(f"{victim} up", lambda: any(h["name"] == victim and h["state"] == "up" for h in api.get("/v1/hosts")))
        totals = [r["total"] for r in rows]
        print(
            f"\nfailover, {len(rows)} host kills (default HA timeouts): median {median(totals):.1f} s, "
            f"worst {max(totals):.1f} s; medians: detect {median([r['detect'] for r in rows]):.1f} s, "
            f"fence wait {median([r['fence_wait'] for r in rows]):.1f} s, boot {median([r['boot'] for r in rows]):.1f} s"
        )
        print(f"lost writes: {lost} runs; double runs: {doubles} samples")
        record(args.out, rows, lost, doubles, accelerators)
    finally:
        subprocess.run([*KASOU, "lab", "down"], env=base, capture_output=True, timeout=180)
        shutil.rmtree(lab_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
