"""Desktop portal: time from a clinician's sign-in to a usable desktop, K pre-started vs none.

One kasou with real tiny guests; a template made of a tiny VM; two desktop pools of 2 linked clones:
``warm`` keeps 1 desktop pre-started, ``cold`` none (the desktop boots when it is asked for). Each
run signs a clinician in (``POST /v1/auth/login``), asks for a desktop (``POST /v1/portal/desktop``),
waits until its guest is up (``guest_ready`` from its heartbeat) and a console ticket is granted
(``POST /v1/vms/NAME/console-ticket``, when the console is there), then signs out (the desktop is
reset) and waits until the pool is back to its resting state before the next run. Prints each run
and the medians.

    flock /tmp/kasou-qemu.lock .venv/bin/python bench/desktops.py [--runs 5]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import ensure_image, kasou_env, median

PW = "bench-password-123"
TIMEOUT_S = 180.0


def wait(what: str, cond: Any, timeout: float = TIMEOUT_S) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = cond()
        if v:
            return v
        time.sleep(0.05)
    raise TimeoutError(f"{what} did not happen within {timeout:.0f} s")


def one_run(base: str, pool: str) -> tuple[float, str, bool]:
    """Sign-in to a usable desktop: seconds, the desktop, whether a console ticket was granted."""
    with httpx.Client(base_url=base, headers={"x-kasou-csrf": "1"}, timeout=120) as c:
        t0 = time.monotonic()
        c.post("/v1/auth/login", json={"name": "nurse", "password": PW}).raise_for_status()
        r = c.post("/v1/portal/desktop", json={"pool": pool})
        r.raise_for_status()
        vm = r.json()["vm"]
        wait(f"{vm} ready", lambda: any(d["vm"] == vm and d["guest_ready"] for d in c.get("/v1/portal/desktop").json()))
        t = c.post(f"/v1/vms/{vm}/console-ticket")
        ticket = t.status_code == 200
        dt = time.monotonic() - t0
        c.post("/v1/auth/logout").raise_for_status()
    return dt, vm, ticket


def resting(api: Any, pool: str, k: int) -> bool:
    p = api.get(f"/v1/desktop-pools/{pool}")
    return bool(p["in_use"] == 0 and all(d["state"] == "free" for d in p["desktops"]) and p["free_ready"] >= k)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    ensure_image()
    with kasou_env() as (_paths, api, env):
        base = "http://" + env["KASOU_API"]
        job = api.post("/v1/vms", json={"name": "deskbase", "image": "tiny", "vcpus": 1, "memory_mib": 128})["job"]
        api.wait_job(job["id"], TIMEOUT_S)
        api.post("/v1/vms/deskbase/template")
        for pool, k in (("warm", 1), ("cold", 0)):
            res = api.post("/v1/desktop-pools", json={"name": pool, "template": "deskbase", "size": 2, "prestart": k})
            api.wait_job(res["job"]["id"], TIMEOUT_S)
        api.post("/v1/users", json={"name": "nurse", "role": "clinician", "password": PW, "pools": ["warm", "cold"]})
        times: dict[str, list[float]] = {"warm": [], "cold": []}
        tickets = True
        for i in range(args.runs):
            for pool, k in (("warm", 1), ("cold", 0)):
                wait(f"pool {pool} at rest", lambda pool=pool, k=k: resting(api, pool, k))
                if pool == "cold":  # none running: every desktop of the cold pool is stopped after its reset
                    wait("cold pool stopped", lambda: all(d["vm_state"] == "stopped" for d in
                                                          api.get("/v1/desktop-pools/cold")["desktops"]))  # fmt: skip
                dt, vm, ticket = one_run(base, pool)
                tickets = tickets and ticket
                times[pool].append(dt)
                print(f"run {i + 1} {pool:4s} ({'K=1 pre-started' if k else 'none pre-started'}): {vm} usable "
                      f"{dt:6.2f} s after sign-in" + ("" if ticket else " (no console ticket)"), flush=True)  # fmt: skip
        w, c = median(times["warm"]), median(times["cold"])
        what = "guest ready + console ticket" if tickets else "guest ready (console tickets not available)"
        print(f"\nsign-in -> usable desktop ({what}), medians of {args.runs}:")
        print(f"  K=1 pre-started: {w:.2f} s")
        print(f"  none pre-started (cold boot): {c:.2f} s")
        print(f"  cold / pre-started: {c / w:.1f}x")


if __name__ == "__main__":
    main()
