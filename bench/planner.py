"""The consolidation planner: hosts used vs the lower bound, solve times, Monte Carlo runs per second.

    .venv/bin/python bench/planner.py [--servers 1000] [--seed 1]

Targets (issue 8): the sample inventory solved optimally in under 5 s; 1,000 generated servers
(published-trace-like sizes, seeded) within 5 % of the lower bound in under 30 s. No QEMU.
"""

from __future__ import annotations

import argparse
import time

from kasou.planner import Options, default_prices, make_plan, sample_inventory
from kasou.planner.availability import simulate
from kasou.planner.generate import generate_inventory


def row(label: str, plan: dict, seconds: float) -> None:
    s = plan["solver"]
    print(f"{label:<34} {plan['servers']:>6} {plan['reserve']:>5} {plan['host_model']['name']:>13} "
          f"{plan['host_count']:>6} {plan['lower_bound_hosts']:>6} {plan['gap_pct']:>6.1f} "
          f"{s['seconds']:>8.2f} {seconds:>8.2f}  {s['name']}, {s['status']}")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--servers", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--mc-runs", type=int, default=5000)
    args = ap.parse_args()
    prices = default_prices()
    print(f"{'inventory':<34} {'VMs':>6} {'resv':>5} {'model':>13} {'hosts':>6} {'bound':>6} {'gap%':>6} "
          f"{'solve s':>8} {'total s':>8}  solver")  # fmt: skip
    plans = {}
    for k in (1, 2):
        t0 = time.perf_counter()
        plans[("sample", k)] = p = make_plan(sample_inventory(), prices, Options(reserve=k, runs=200))
        row("sample (400-bed hospital)", p, time.perf_counter() - t0)
    servers = generate_inventory(args.servers, args.seed)
    for k in (1, 2):
        t0 = time.perf_counter()
        plans[("gen", k)] = p = make_plan(servers, prices, Options(reserve=k, runs=200))
        row(f"generated, seed {args.seed}", p, time.perf_counter() - t0)
    t0 = time.perf_counter()
    p = make_plan(servers, prices, Options(reserve=1, runs=200, solver="exact", time_limit=20,
                                           model=plans[("gen", 1)]["host_model"]["name"]))  # fmt: skip
    row("generated, CP-SAT for comparison", p, time.perf_counter() - t0)
    print()
    for key, label in ((("sample", 1), "sample"), (("gen", 1), f"{args.servers} servers")):
        plan = plans[key]
        host_of, names = [], {}
        for h, host in enumerate(plan["hosts"]):
            for v in host["vms"]:
                names[v["name"]] = h
        inv = sample_inventory() if key[0] == "sample" else servers
        host_of = [names[s.name] for s in inv]
        t0 = time.perf_counter()
        res = simulate(inv, host_of, plan["host_count"], 1, prices.cycle.years, prices.availability,
                       runs=args.mc_runs, seed=1)  # fmt: skip
        dt = time.perf_counter() - t0
        print(f"Monte Carlo, {label}: {args.mc_runs} runs of {prices.cycle.years} years in {dt:.2f} s = "
              f"{args.mc_runs / dt:,.0f} runs/s ({len(inv)} systems, {plan['host_count']} hosts)")  # fmt: skip
        for crit, e in res["classes"].items():
            print(f"  {crit:<15} downtime min/yr before {e['before']['mean_min_per_year']:>8.1f}  "
                  f"after {e['after']['mean_min_per_year']:>6.1f} (p99 {e['after']['p99_min_per_year']:.1f})")  # fmt: skip


if __name__ == "__main__":
    main()
