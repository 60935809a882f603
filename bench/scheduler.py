"""Scheduler speed: place 10,000 VMs on 1,000 hosts, and how full the hosts end up.

    .venv/bin/python bench/scheduler.py [--vms 10000] [--hosts 1000] [--seed 1]

Sizes follow a hospital-like mix (many small department servers, a few large
databases); the lower bound is total demand / host capacity.
"""

from __future__ import annotations

import argparse
import math
import random
import time

from kasou.control.scheduler import VM_OVERHEAD_MIB, HostLoad, Placer, Request


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--vms", type=int, default=10000)
    ap.add_argument("--hosts", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    sizes = [(1024, 1), (2048, 1), (4096, 2), (8192, 4), (16384, 8)]
    weights = [30, 30, 25, 10, 5]
    reqs = [Request(f"vm{i}", *rng.choices(sizes, weights)[0]) for i in range(args.vms)]
    hosts = [HostLoad(f"h{i}", 32, 393216) for i in range(args.hosts)]
    t0 = time.perf_counter()
    placer = Placer(hosts)
    for r in reqs:
        placer.place(r)
    took = time.perf_counter() - t0
    demand = sum(r.memory_mib + VM_OVERHEAD_MIB for r in reqs)
    used = [h for h in hosts if h.memory_used_mib]
    print(f"placed {args.vms} VMs on {args.hosts} hosts in {took:.3f} s ({args.vms / took:,.0f} placements/s)")
    print(f"hosts used: {len(used)} (memory lower bound {math.ceil(demand / hosts[0].memory_capacity_mib)})")


if __name__ == "__main__":
    main()
