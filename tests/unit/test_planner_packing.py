"""kasou.planner.packing and the plan: known optima, lower bounds, the reserve checker, property tests."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kasou.control import scheduler
from kasou.planner import Options, check_plan, default_prices, make_plan, sizing
from kasou.planner.generate import generate_inventory
from kasou.planner.packing import (
    Item,
    capacity_lower_bound,
    exact,
    first_fit_decreasing,
    heuristic,
    layout_violations,
    reserve_violations,
    restart_placement,
    spread,
    with_reserve,
)


def items1(*sizes: int, groups: dict[int, str] | None = None) -> list[Item]:
    groups = groups or {}
    return [Item(f"v{i}", (s,), groups.get(i)) for i, s in enumerate(sizes)]


def test_the_planner_uses_kasous_placement_rules() -> None:
    assert sizing.VM_OVERHEAD_MIB == scheduler.VM_OVERHEAD_MIB
    for total in (1024, 8192, 262144, 1048576):
        assert sizing.host_reserve_mib(total) == scheduler.host_reserve_mib(total)
    assert default_prices().policy.vcpu_ratio == scheduler.DEFAULT_VCPU_RATIO


@pytest.mark.parametrize(
    ("sizes", "groups", "optimum"),
    [
        ((5, 5, 5, 5), {}, 2),
        ((6, 6, 6), {}, 3),
        ((5, 4, 3, 3, 3, 2), {}, 2),  # first-fit decreasing needs 3 here
        ((1, 1, 1), {0: "g", 1: "g", 2: "g"}, 3),  # anti-affinity: one per host
        ((2, 2, 2, 2), {0: "a", 1: "a"}, 2),
        ((10,), {}, 1),
    ],
)
def test_known_optima(sizes: tuple[int, ...], groups: dict[int, str], optimum: int) -> None:
    items, cap = items1(*sizes, groups=groups), (10,)
    h = heuristic(items, cap)
    res = exact(items, cap, h, time_limit=5, workers=1)
    assert res.optimal and len(res.layout) == optimum == res.bound
    assert layout_violations(res.layout, items, cap) == []
    assert capacity_lower_bound(items, cap) <= optimum <= len(h)


def test_first_fit_decreasing_is_not_optimal_where_cp_sat_is() -> None:
    items, cap = items1(5, 4, 3, 3, 3, 2), (10,)
    assert len(first_fit_decreasing(items, cap)) == 3
    assert len(exact(items, cap, heuristic(items, cap), time_limit=5, workers=1).layout) == 2


def test_lower_bound_per_dimension_and_group() -> None:
    items = [Item("a", (6, 1)), Item("b", (6, 1)), Item("c", (1, 9), "g"), Item("d", (1, 9), "g")]
    assert capacity_lower_bound(items, (10, 10)) == 2
    assert capacity_lower_bound([*items, Item("e", (1, 1), "g")], (10, 10)) == 3


def test_reserve_by_construction_and_its_checker() -> None:
    items, cap = items1(6, 6, 4, 4), (10,)
    packed = exact(items, cap, heuristic(items, cap), time_limit=5, workers=1).layout
    assert len(packed) == 2
    for k in (1, 2):
        hosts = with_reserve(packed, k)
        assert len(hosts) == 2 + k
        assert reserve_violations(hosts, items, cap, k) == []
    # Two full hosts and no reserve: losing either leaves no room.
    assert reserve_violations(packed, items, cap, 1)
    # A balanced spread of 4 x 5 on 3 hosts of 10 survives one loss (5 + 5 fit two hosts' free room)...
    even = items1(5, 5, 5, 5)
    layout = [[0, 1], [2], [3]]
    assert reserve_violations(layout, even, cap, 1) == []
    placement = restart_placement(layout, even, cap, [0])
    assert placement is not None and set(placement) == {0, 1} and set(placement.values()) == {1, 2}
    # ... but not two.
    assert reserve_violations(layout, even, cap, 2)


def test_restart_keeps_anti_affinity() -> None:
    items = items1(3, 3, 3, groups={0: "g", 1: "g"})
    cap = (10,)
    # Host 0 has v0, host 1 has v1 and v2; if host 0 fails v0 cannot join v1's host.
    assert restart_placement([[0], [1, 2]], items, cap, [0]) is None
    assert restart_placement([[0], [1, 2], []], items, cap, [0]) == {0: 2}


sizes = st.lists(st.tuples(st.integers(1, 10), st.integers(1, 10)), min_size=1, max_size=14)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(sizes, st.integers(0, 2), st.integers(0, 3))
def test_every_packing_respects_capacity_reserve_and_anti_affinity(
    raw: list[tuple[int, int]], reserve: int, pairs: int
) -> None:
    cap = (10, 12)
    items = [Item(f"v{i}", s, f"p{i // 2}" if i < 2 * pairs else None) for i, s in enumerate(raw)]
    h = heuristic(items, cap, time_limit=2)
    assert layout_violations(h, items, cap) == []
    res = exact(items, cap, h, time_limit=2, workers=1)
    assert layout_violations(res.layout, items, cap) == []
    assert capacity_lower_bound(items, cap) <= res.bound <= len(res.layout) <= len(h)
    hosts = with_reserve(res.layout, reserve)
    assert reserve_violations(hosts, items, cap, reserve) == []
    balanced = spread(hosts, items, cap)
    if balanced is not None:
        assert layout_violations(balanced, items, cap) == []
    # N+1 in words: remove any one host, and its VMs find room on the others.
    if reserve >= 1:
        for failed in range(len(hosts)):
            assert restart_placement(hosts, items, cap, [failed]) is not None or not hosts[failed]


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(4, 40), st.integers(0, 10_000), st.sampled_from(["N+1", "N+2"]))
def test_every_plan_checks_out(n: int, seed: int, reserve: str) -> None:
    servers = generate_inventory(n, seed, pair_share=0.2)
    k = int(reserve[-1])
    plan = make_plan(servers, default_prices(), Options(reserve=k, time_limit=2, runs=20, workers=1))
    assert check_plan(plan) == []
    assert plan["host_count"] >= plan["lower_bound_hosts"] >= k + 1
    assert sorted(v["name"] for h in plan["hosts"] for v in h["vms"]) == sorted(s.name for s in servers)
    cap = plan["capacity_per_host"]
    for h in plan["hosts"]:
        assert sum(v["memory_mib"] + 96 for v in h["vms"]) <= cap["memory"]
        assert sum(v["vcpus"] for v in h["vms"]) <= cap["vcpus"]
        groups = [v["anti_affinity"] for v in h["vms"] if v["anti_affinity"]]
        assert len(groups) == len(set(groups))
    # Removing any k hosts leaves a restart placement (check_plan did it; say it once more by hand for N+1).
    names = [h["name"] for h in plan["hosts"]]
    for gone in itertools.combinations(range(len(names)), k):
        survivors = [h for i, h in enumerate(plan["hosts"]) if i not in gone]
        free = sum(cap["memory"] - sum(v["memory_mib"] + 96 for v in h["vms"]) for h in survivors)
        displaced = sum(v["memory_mib"] + 96 for i in gone for v in plan["hosts"][i]["vms"])
        assert displaced <= free


def test_sample_plan_is_optimal_and_fast() -> None:
    from kasou.planner import sample_inventory

    plan = make_plan(sample_inventory(), default_prices(), Options(reserve=1, time_limit=5, runs=100))
    assert plan["host_count"] == plan["lower_bound_hosts"] and plan["solver"]["optimal"]
    assert plan["solver"]["name"].startswith("CP-SAT") and plan["solver"]["seconds"] < 5
    assert check_plan(plan) == []
    chosen = [m for m in plan["models_considered"] if m["chosen"]]
    assert len(chosen) == 1 and chosen[0]["after_total_yen"] == min(
        m["after_total_yen"] for m in plan["models_considered"] if m["feasible"]
    )


def test_a_thousand_servers_by_the_heuristic_within_five_percent() -> None:
    servers = generate_inventory(1000, 7)
    plan = make_plan(servers, default_prices(), Options(reserve=1, model="2u-48c-512g", runs=50))
    assert plan["solver"]["name"].startswith("first-fit")
    assert plan["host_count"] <= plan["lower_bound_hosts"] * 1.05
    assert check_plan(plan) == []
