"""Placement as ``vm create`` does it: time per decision, and how evenly the hosts end up loaded.

    .venv/bin/python bench/scheduler.py [--hosts 100,1000] [--vms-per-host 10] [--seed 1]

``vm create`` (kasou.control.vm_create) asks ``kasou.control.scheduler.place`` for a host:
a pass over every host that takes the one with the most free memory (a spreading policy, so
every host gets used). This bench places VMs one after another the same way (each decision
sees the loads the earlier ones left) and prints, for each cluster size:

* the time of one decision (median, p99, worst), what ``vm create`` adds to gathering the
  loads (``VMService.host_loads``, which asks every agent and reads the VM records; not timed
  here);
* the balance: the spread of free memory (most free - least free) and the most loaded host
  against the lower bound of any placement (max of the even split and the largest VM), and the
  same for an offline placement that knows every VM in advance (largest first, LPT) beside it;
* for comparison, HA's ``Placer`` (a heap; used to plan restarts after a host failure) on the
  same requests.

Sizes follow a hospital-like mix (many small department servers, a few large databases).
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

from kasou.control.scheduler import VM_OVERHEAD_MIB, HostLoad, Placer, Request, place

SIZES = [(1024, 1), (2048, 1), (4096, 2), (8192, 4), (16384, 8)]  # (MiB, vCPUs)
WEIGHTS = [30, 30, 25, 10, 5]
HOST_CPUS, HOST_MIB = 32, 393216


def hosts(n: int) -> list[HostLoad]:
    return [HostLoad(f"h{i}", HOST_CPUS, HOST_MIB) for i in range(n)]


def balance(loads: list[HostLoad], reqs: list[Request]) -> dict[str, float]:
    used = [h.memory_used_mib for h in loads]
    free = [h.memory_free_mib for h in loads]
    demand = sum(r.memory_mib + VM_OVERHEAD_MIB for r in reqs)
    bound = max(demand / len(loads), max(r.memory_mib + VM_OVERHEAD_MIB for r in reqs))
    return {"spread": max(free) - min(free), "max_used": max(used), "bound": bound, "mean": demand / len(loads)}


def run(n_hosts: int, per_host: int, rng: random.Random) -> None:
    reqs = [Request(f"vm{i}", *rng.choices(SIZES, WEIGHTS)[0]) for i in range(n_hosts * per_host)]
    loads = hosts(n_hosts)
    times = []
    for r in reqs:
        t0 = time.perf_counter()
        h = place(r, loads)
        times.append(time.perf_counter() - t0)
        h.add(r.memory_mib, r.vcpus, r.group)  # what the created VM then uses
    b = balance(loads, reqs)

    offline = hosts(n_hosts)
    lpt = Placer(offline)
    for r in sorted(reqs, key=lambda r: -r.memory_mib):
        lpt.place(r)
    o = balance(offline, reqs)

    ha = Placer(hosts(n_hosts))
    t0 = time.perf_counter()
    for r in reqs:
        ha.place(r)
    ha_each = (time.perf_counter() - t0) / len(reqs)

    ms = sorted(t * 1000 for t in times)
    p99 = ms[min(len(ms) - 1, int(0.99 * len(ms)))]
    print(f"{n_hosts} hosts, {len(reqs)} VMs placed one by one with scheduler.place (vm create's choice):")
    print(f"  decision time per VM: median {statistics.median(ms):.3f} ms, p99 {p99:.3f} ms, worst {ms[-1]:.3f} ms")
    print(
        f"  balance: free memory spread {b['spread']:,} MiB (most - least free); most loaded host "
        f"{b['max_used']:,} MiB vs lower bound {b['bound']:,.0f} MiB (+{100 * (b['max_used'] / b['bound'] - 1):.1f} %; "
        f"even split {b['mean']:,.0f} MiB)"
    )
    print(
        f"  offline, largest first (knows every VM in advance): spread {o['spread']:,} MiB, most loaded "
        f"{o['max_used']:,} MiB (+{100 * (o['max_used'] / o['bound'] - 1):.1f} %)"
    )
    print(f"  HA's Placer (heap, restart planning) on the same requests: {ha_each * 1000:.4f} ms per VM")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hosts", default="100,1000", help="cluster sizes, comma-separated")
    ap.add_argument("--vms-per-host", type=int, default=10)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    for n in (int(x) for x in args.hosts.split(",")):
        run(n, args.vms_per_host, random.Random(args.seed))


if __name__ == "__main__":
    main()
