"""A consolidation plan: for each host model, size the VMs, pack them, add the failover reserve,
check the result, cost it; keep the cheapest over the cycle; simulate its availability.

:func:`make_plan` returns the plan as a JSON-ready dict (the shape ``kasou plan --json`` prints and
``kasou plan apply`` reads); :func:`check_plan` re-verifies such a dict independently.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from kasou.errors import InsufficientResources, InvalidSpec
from kasou.planner import availability, packing, tco
from kasou.planner.inventory import Server
from kasou.planner.prices import HostModel, PriceSheet
from kasou.planner.sizing import DIMENSIONS, VM, capacity, size_vm, why_too_big

PLAN_VERSION = 1
RESERVES = {"N+0": 0, "N+1": 1, "N+2": 2}


def parse_reserve(text: str) -> int:
    key = text.strip().upper().replace(" ", "")
    if key not in RESERVES:
        raise InvalidSpec(f"reserve must be N+1 or N+2 (or N+0 for none), not {text!r}", field="reserve")
    return RESERVES[key]


@dataclass(frozen=True)
class Options:
    reserve: int = 1
    solver: str = "auto"  # auto, exact (CP-SAT), heuristic
    time_limit: float = 10.0  # seconds per host model for the exact solver
    exact_max_vms: int = 300  # auto: CP-SAT up to this many VMs, the heuristic beyond
    model: str | None = None  # only this host model
    seed: int = 1
    runs: int | None = None  # Monte Carlo runs (default: the price sheet's)
    workers: int = 0  # CP-SAT workers (0: up to 2, this machine's cores)
    verify: bool = True  # check every k-host failure (slow for N+2 on thousands of VMs)


@dataclass
class Candidate:
    model: HostModel
    vms: list[VM]
    layout: packing.Layout
    packed_hosts: int
    packing_bound: int
    capacity_bound: int
    solver: str
    status: str
    seconds: float
    balanced: bool
    costs: dict[str, Any]


def _pack(vms: list[VM], model: HostModel, prices: PriceSheet, opts: Options) -> Candidate:
    cap = capacity(model, prices.policy)
    items = [packing.Item(v.name, v.size, v.group) for v in vms]
    t0 = time.perf_counter()
    use_exact = opts.solver == "exact" or (opts.solver == "auto" and len(vms) <= opts.exact_max_vms)
    layout = packing.heuristic(items, cap, time_limit=max(1.0, opts.time_limit))
    cap_bound = packing.capacity_lower_bound(items, cap)
    bound, status, solver = cap_bound, "feasible", "first-fit decreasing + improvement"
    if len(layout) <= cap_bound:
        status = "optimal"
    if use_exact:
        workers = opts.workers or min(2, os.cpu_count() or 1)
        res = packing.exact(items, cap, layout, opts.time_limit, workers)
        layout, bound, solver = res.layout, res.bound, "CP-SAT (OR-Tools)"
        status = "optimal" if res.optimal else "feasible (time limit)"
    seconds = time.perf_counter() - t0
    packed = len(layout)
    hosts = packing.with_reserve(layout, opts.reserve, prices.policy.min_hosts)
    balanced = False
    spread = packing.spread(hosts, items, cap)
    if spread is not None and (
        not opts.verify or not packing.reserve_violations(spread, items, cap, opts.reserve, first_only=True)
    ):
        hosts, balanced = spread, True
    problems = packing.layout_violations(hosts, items, cap)
    if opts.verify:
        problems += packing.reserve_violations(hosts, items, cap, opts.reserve)
    if problems:  # by construction this cannot happen; refuse rather than print a wrong plan
        raise InsufficientResources(f"internal: the plan for {model.name} fails its own check: {problems[0]}")
    uses = [tco.HostUse(sum(vms[i].cpu_avg_cc for i in m) / (model.cores * 100)) for m in hosts]
    return Candidate(model, vms, hosts, packed, bound, cap_bound, solver, status, seconds, balanced,
                     {"uses": uses})  # fmt: skip


def make_plan(servers: Sequence[Server], prices: PriceSheet, opts: Options | None = None,
              source: str = "inventory") -> dict[str, Any]:  # fmt: skip
    """The plan for ``servers``: the cheapest host model over the cycle with every VM placed."""
    opts = opts or Options()
    if opts.solver not in ("auto", "exact", "heuristic"):
        raise InvalidSpec(f"solver must be auto, exact or heuristic, not {opts.solver!r}", field="solver")
    models = list(prices.host_models)
    if opts.model is not None:
        models = [m for m in models if m.name == opts.model]
        if not models:
            known = ", ".join(m.name for m in prices.host_models)
            raise InvalidSpec(f"no host model {opts.model!r} in the price sheet (known: {known})", field="model")
    considered: list[dict[str, Any]] = []
    best: Candidate | None = None
    for model in models:
        vms = [size_vm(s, model, prices.policy) for s in servers]
        cap = capacity(model, prices.policy)
        too_big = next((r for v in vms if (r := why_too_big(v, cap))), None)
        if too_big:
            considered.append({"model": model.name, "feasible": False, "reason": too_big})
            continue
        cand = _pack(vms, model, prices, opts)
        cand.costs = tco.tco(servers, vms, model, cand.costs["uses"], prices)
        considered.append({
            "model": model.name, "feasible": True, "hosts": len(cand.layout), "status": cand.status,
            "after_total_yen": cand.costs["after_total_yen"], "solve_s": round(cand.seconds, 3),
        })  # fmt: skip
        if best is None or cand.costs["after_total_yen"] < best.costs["after_total_yen"]:
            best = cand
    if best is None:
        reasons = "; ".join(f"{c['model']}: {c['reason']}" for c in considered)
        raise InsufficientResources(f"no host model can carry every server: {reasons}")
    for c in considered:
        c["chosen"] = c["model"] == best.model.name
    return _plan_dict(servers, prices, opts, best, considered, source)


def _plan_dict(servers: Sequence[Server], prices: PriceSheet, opts: Options, c: Candidate,
               considered: list[dict[str, Any]], source: str) -> dict[str, Any]:  # fmt: skip
    model, vms = c.model, c.vms
    cap = capacity(model, prices.policy)
    k = opts.reserve
    n_hosts = len(c.layout)
    lower = max(c.packing_bound + k, prices.policy.min_hosts)
    reserve_empty = 0 if c.balanced else n_hosts - c.packed_hosts
    hosts: list[dict[str, Any]] = []
    host_of = [0] * len(vms)
    for h, members in enumerate(c.layout):
        load = [sum(vms[i].size[d] for i in members) for d in range(len(cap))]
        avg = sum(vms[i].cpu_avg_cc for i in members)
        for i in members:
            host_of[i] = h
        hosts.append({
            "name": f"host-{h + 1:02d}",
            "model": model.name,
            "role": "reserve" if not members else "active",
            "cpus": model.cores,
            "memory_mib": model.memory_gib * 1024,
            "memory_capacity_mib": cap[0],
            "use": {dim: round(load[d] / cap[d], 4) for d, dim in enumerate(DIMENSIONS)}
                   | {"cpu_avg": round(avg / (model.cores * 100), 4)},
            "vms": [_vm_dict(vms[i]) for i in sorted(members, key=lambda i: vms[i].name)],
        })  # fmt: skip
    avail = availability.simulate(servers, host_of, n_hosts, k, prices.cycle.years, prices.availability,
                                  runs=opts.runs, seed=opts.seed)  # fmt: skip
    return {
        "kasou_plan": PLAN_VERSION,
        "inventory": source,
        "servers": len(servers),
        "reserve": f"N+{k}",
        "host_model": {
            "name": model.name,
            "cores": model.cores,
            "clock_ghz": model.clock_ghz,
            "memory_gib": model.memory_gib,
            "iops": model.iops,
            "rack_u": model.rack_u,
            "price_yen": model.price_yen,
        },
        "host_count": n_hosts,
        "lower_bound_hosts": lower,
        "gap_hosts": n_hosts - lower,
        "gap_pct": round(100 * (n_hosts - lower) / lower, 1) if lower else 0.0,
        "solver": {
            "name": c.solver,
            "status": c.status,
            "seconds": round(c.seconds, 3),
            "packed_hosts": c.packed_hosts,
            "packing_lower_bound": c.packing_bound,
            "capacity_lower_bound": c.capacity_bound,
            "placement": "balanced (reserve verified for every failure)"
            if c.balanced
            else f"packed, with {reserve_empty} empty reserve host(s)",
            "optimal": n_hosts <= lower,
        },
        "capacity_per_host": dict(zip(DIMENSIONS, cap, strict=True)),
        "hosts": hosts,
        "models_considered": considered,
        "costs": c.costs,
        "availability": avail,
        "assumptions": {
            "costs": tco.assumptions(prices),
            "availability": availability.assumptions(prices.availability),
        },
        "prices": prices.to_dict(),
    }


def _vm_dict(v: VM) -> dict[str, Any]:
    return {
        "name": v.name, "memory_mib": v.memory_mib, "vcpus": v.vcpus, "department": v.department,
        "criticality": v.criticality, "anti_affinity": v.group, "disk_gib": v.disk_gib, "iops": v.iops,
        "cpu_peak_cores": v.cpu_peak_cc / 100, "cpu_avg_cores": v.cpu_avg_cc / 100,
    }  # fmt: skip


def check_plan(plan: dict[str, Any]) -> list[str]:
    """Re-verify a plan dict on its own figures: every host within capacity, anti-affinity kept, and for
    every set of ``reserve`` failed hosts a restart placement on the others. Empty when all holds."""
    cap_d = plan["capacity_per_host"]
    cap = tuple(int(cap_d[d]) for d in DIMENSIONS)
    items: list[packing.Item] = []
    layout: packing.Layout = []
    for h in plan["hosts"]:
        members = []
        for v in h["vms"]:
            size = (v["memory_mib"] + 96, v["vcpus"], round(v["cpu_peak_cores"] * 100), v["iops"])
            members.append(len(items))
            items.append(packing.Item(v["name"], size, v.get("anti_affinity")))
        layout.append(members)
    k = int(str(plan["reserve"]).split("+")[1])
    return packing.layout_violations(layout, items, cap) + packing.reserve_violations(layout, items, cap, k)
