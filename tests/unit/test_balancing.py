"""The balancer's decisions (kasou.control.balancing) on skewed clusters, without any hypervisor."""

from __future__ import annotations

import random

from kasou.control import scheduler
from kasou.control.balancing import BalanceHost, BalanceVM, Plan, Policy, place_spread, plan
from kasou.control.ha import n_plus_one_violation

GIB16 = 16384  # capacity for VMs: 16384 - 819 = 15565 MiB
CAP = GIB16 - scheduler.host_reserve_mib(GIB16)


def mib(percent: float) -> int:
    """Guest memory that makes ``percent`` of a 16 GiB host's capacity with QEMU's overhead."""
    return round(CAP * percent / 100) - scheduler.VM_OVERHEAD_MIB


def three(excluded: dict[str, str] | None = None) -> list[BalanceHost]:
    ex = excluded or {}
    return [BalanceHost(h, 4, GIB16, ex.get(h)) for h in ("h1", "h2", "h3")]


def apply(vms: list[BalanceVM], p: Plan) -> list[BalanceVM]:
    to = {m.vm: m.target for m in p.moves}
    return [BalanceVM(**{**v.__dict__, "host": to.get(v.name, v.host)}) for v in vms]


def test_a_skewed_cluster_spreads_its_vms_over_the_empty_hosts() -> None:
    vms = [BalanceVM(f"vm{i}", "h1", 2048, 1) for i in range(4)]
    p = plan(three(), vms, Policy(threshold=20))
    assert p.spread_before["memory"] > 50
    assert [m.source for m in p.moves] == ["h1", "h1"]
    assert {m.target for m in p.moves} == {"h2", "h3"}  # one to each, not both to one
    assert p.spread_after["memory"] <= 20
    first = p.moves[0]
    assert first.resource == "memory" and first.spread_before > first.spread_after
    assert "h1 55%" in first.reason and "spread" in first.reason
    assert p.summary.startswith("balanced")


def test_a_balanced_cluster_makes_no_move() -> None:
    vms = [BalanceVM(f"vm{h}", h, 2048, 1) for h in ("h1", "h2", "h3")]
    p = plan(three(), vms, Policy(threshold=20))
    assert p.moves == [] and p.spread_before["memory"] == 0 and p.summary.startswith("balanced")


def test_the_threshold_decides_whether_a_spread_is_worth_moves() -> None:
    vms = [BalanceVM("a", "h1", mib(30), 1), BalanceVM("b", "h2", mib(15), 1), BalanceVM("c", "h3", mib(15), 1)]
    assert plan(three(), vms, Policy(threshold=20)).moves == []  # 15 points: tolerated
    assert plan(three(), vms, Policy(threshold=10)).moves == []  # only 'a' could move: it would overshoot
    vms += [BalanceVM("d", "h1", mib(10), 1)]  # h1 40 %
    p = plan(three(), vms, Policy(threshold=10))
    assert [(m.vm, m.source) for m in p.moves] == [("d", "h1")]


def test_at_most_max_moves_per_round() -> None:
    vms = [BalanceVM(f"vm{i}", "h1", 1024, 1) for i in range(10)]
    p = plan(three(), vms, Policy(threshold=5, max_moves=3))
    assert len(p.moves) == 3
    assert "stopped after 3 moves" in p.summary


def test_anti_affinity_keeps_a_group_apart() -> None:
    hosts = [BalanceHost("h1", 4, GIB16), BalanceHost("h2", 4, GIB16)]
    vms = [BalanceVM("db1", "h1", mib(20), 1), BalanceVM("w", "h1", mib(15), 1), BalanceVM("db2", "h2", mib(10), 1)]
    free = plan(hosts, vms, Policy(threshold=10, hysteresis=1))
    assert [m.vm for m in free.moves] == ["w"]
    grouped = [BalanceVM(**{**v.__dict__, "group": "emr-db" if v.name.startswith("db") else None}) for v in vms]
    p = plan(hosts, grouped, Policy(threshold=10, hysteresis=1))
    assert all(not (m.vm == "db1" and m.target == "h2") for m in p.moves)
    big = [BalanceVM("db1", "h1", mib(25), 1, group="g"), BalanceVM("db2", "h2", mib(5), 1, group="g")]
    assert plan(hosts, big, Policy(threshold=10, hysteresis=1)).moves == []  # the only VM to move may not


def test_hosts_in_maintenance_or_down_are_never_targets_and_their_vms_stay() -> None:
    hosts = three({"h2": "in maintenance", "h3": "down"})
    vms = [BalanceVM(f"vm{i}", "h1", 2048, 1) for i in range(4)] + [BalanceVM("m", "h2", 1024, 1)]
    p = plan(hosts, vms, Policy(threshold=5))
    assert p.moves == [] and p.excluded == {"h2": "in maintenance", "h3": "down"}
    assert p.spread_before["memory"] == 0  # one host takes part: nothing to compare
    hosts = three({"h3": "in maintenance"})
    p = plan(hosts, vms, Policy(threshold=5))
    assert p.moves and all(m.target == "h2" for m in p.moves) and "m" not in {m.vm for m in p.moves}


def test_vms_that_may_not_move_are_held_with_their_reason() -> None:
    vms = [BalanceVM(f"vm{i}", "h1", 2048, 1, blocker="its disks are local to h1") for i in range(3)]
    vms.append(BalanceVM("cool", "h1", 2048, 1, blocker="the balancer moved it 60 s ago (cool-down 1800 s)"))
    p = plan(three(), vms, Policy(threshold=20))
    assert p.moves == []
    assert p.held["cool"].startswith("the balancer moved it") and p.held["vm0"] == "its disks are local to h1"
    assert "4 VMs may not move" in p.summary


def test_the_ha_reserve_stays() -> None:
    """h2's HA VM needs half a host if h2 fails; only h3 has that room. Filling h3 would lose it."""
    vms = [BalanceVM(f"w{i}", "h1", mib(15), 1) for i in range(6)]  # h1 90 %
    vms += [BalanceVM("crit", "h2", mib(50), 2, ha=True), BalanceVM("x", "h3", mib(40), 1)]
    plain = plan(three(), [BalanceVM(**{**v.__dict__, "ha": False}) for v in vms], Policy(threshold=10))
    assert plain.moves[0].target == "h3"
    p = plan(three(), vms, Policy(threshold=10))
    assert p.moves and p.moves[0].target == "h2"
    for i in range(1, len(p.moves) + 1):  # after every move the HA VMs of any one host can restart elsewhere
        where = {**{v.name: v.host for v in vms}, **{m.vm: m.target for m in p.moves[:i]}}
        loads = {h: scheduler.HostLoad(h, 4, GIB16) for h in ("h1", "h2", "h3")}
        placed: dict[str, list[scheduler.Request]] = {}
        for v in vms:
            loads[where[v.name]].add(v.memory_mib, v.vcpus)
            if v.ha:
                placed.setdefault(where[v.name], []).append(scheduler.Request(v.name, v.memory_mib, v.vcpus))
        assert n_plus_one_violation(list(loads.values()), placed, 4.0) is None


def test_cpu_pressure_moves_a_busy_vm() -> None:
    vms = [BalanceVM("busy1", "h1", 1024, 2, cpu_cores=1.8), BalanceVM("busy2", "h1", 1024, 2, cpu_cores=1.6)]
    vms += [BalanceVM("idle", "h2", 1024, 1, cpu_cores=0.05)]
    hosts = [BalanceHost("h1", 4, GIB16), BalanceHost("h2", 4, GIB16)]
    p = plan(hosts, vms, Policy(threshold=20))
    assert len(p.moves) == 1 and p.moves[0].resource == "cpu" and p.moves[0].target == "h2"
    assert "CPU pressure h1 85%" in p.moves[0].reason


def test_a_move_that_only_swaps_the_hot_host_is_refused() -> None:
    """Two hosts, one VM: moving it makes the other host as hot: it would come back next round."""
    hosts = [BalanceHost("h1", 4, GIB16), BalanceHost("h2", 4, GIB16)]
    p = plan(hosts, [BalanceVM("only", "h1", mib(40), 1)], Policy(threshold=10))
    assert p.moves == [] and "no allowed move" in p.summary


def _squares(hosts: list[BalanceHost], vms: list[BalanceVM]) -> float:
    p = plan(hosts, vms, Policy(threshold=1000))
    return sum(v**2 for rs in p.pressure_before.values() for v in rs.values())


def test_no_ping_pong_over_repeated_rounds_on_random_clusters() -> None:
    """Rounds with the plan applied in between: no move is ever undone, the load evens out, and the rounds end."""
    rng = random.Random(18)
    for _ in range(40):
        hosts = [BalanceHost(f"h{i}", rng.choice((4, 8)), rng.choice((16384, 32768))) for i in range(rng.randint(2, 5))]
        vms = [
            BalanceVM(f"v{j}", rng.choice(hosts[:2]).name, rng.choice((512, 1024, 2048)), rng.randint(1, 2),
                      cpu_cores=rng.random(), group=rng.choice((None, None, "g1", "g2")))
            for j in range(rng.randint(3, 14))
        ]  # fmt: skip
        # Anti-affinity: drop later VMs of a group already on their host (the input is a valid placement).
        seen: set[tuple[str, str]] = set()
        vms = [v for v in vms if v.group is None or ((v.group, v.host) not in seen and not seen.add((v.group, v.host)))]
        history: dict[str, list[str]] = {v.name: [v.host] for v in vms}
        last = _squares(hosts, vms)
        for _round in range(30):
            p = plan(hosts, vms, Policy(threshold=10, hysteresis=3, max_moves=2))
            if not p.moves:
                break
            for m in p.moves:
                assert history[m.vm][-1] == m.source
                history[m.vm].append(m.target)
            vms = apply(vms, p)
            now = _squares(hosts, vms)
            assert now < last  # every round lowers the sum of squares: no state comes back
            last = now
        else:
            raise AssertionError("the rounds did not end")
        for name, path in history.items():
            assert len(path) == len(set(path)), f"{name} went back: {path}"


def test_maintenance_placement_spreads_by_load() -> None:
    """Four VMs leave a host: each goes where it leaves the least pressure, counting the ones before."""
    loads = [scheduler.HostLoad("h2", 4, 16384), scheduler.HostLoad("h3", 4, 32768)]
    placed = []
    for i in range(4):
        h = place_spread(scheduler.Request(f"v{i}", 4096, 1), loads)
        h.add(4096, 1)
        placed.append(h.name)
    assert placed.count("h3") == 3 and placed.count("h2") == 1  # the bigger host takes more, not all
    loads = [scheduler.HostLoad("h2", 4, 16384), scheduler.HostLoad("h3", 4, 16384)]
    for i in range(4):
        h = place_spread(scheduler.Request(f"v{i}", 2048, 1), loads)
        h.add(2048, 1)
    assert [h.vcpus_used for h in loads] == [2, 2]
