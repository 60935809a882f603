"""N+1 admission: HA keeps room to restart the HA VMs of any one host on the others."""

from __future__ import annotations

from kasou.control.ha import n_plus_one_violation
from kasou.control.scheduler import VM_OVERHEAD_MIB, HostLoad, Request

GIB = 1024


def hosts(*used: int) -> list[HostLoad]:
    out = []
    for i, u in enumerate(used, 1):
        h = HostLoad(f"h{i}", cpus=8, memory_total_mib=16 * GIB)
        if u:
            h.add(u - VM_OVERHEAD_MIB, 1)
        out.append(h)
    return out


def test_one_host_has_nothing_to_keep_free() -> None:
    loads = hosts(10 * GIB)
    assert n_plus_one_violation(loads, {"h1": [Request("a", 10 * GIB, 1)]}, 4) is None


def test_room_on_the_others_is_fine() -> None:
    loads = hosts(8 * GIB, 2 * GIB, 2 * GIB)
    placed = {"h1": [Request("a", 4 * GIB, 1), Request("b", 4 * GIB, 1)]}
    assert n_plus_one_violation(loads, placed, 4) is None


def test_too_little_room_is_explained() -> None:
    loads = hosts(12 * GIB, 12 * GIB)
    placed = {"h1": [Request("emr", 12 * GIB, 1)]}
    why = n_plus_one_violation(loads, placed, 4)
    assert why is not None and "HA VMs of h1" in why and "emr" in why


def test_anti_affinity_counts_on_failover() -> None:
    loads = hosts(2 * GIB, 2 * GIB, 0)
    loads[1].groups.add("db")
    loads[2].groups.add("db")
    placed = {"h1": [Request("db1", 1 * GIB, 1, "db")]}
    assert n_plus_one_violation(loads, placed, 4) is not None
