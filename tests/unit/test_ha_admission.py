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


def _lab(*vcpus_used: int) -> list[HostLoad]:
    """The lab's hosts: 2 CPUs, 16 GiB each, with this many one-vCPU VMs of 128 MiB."""
    out = []
    for i, n in enumerate(vcpus_used, 1):
        h = HostLoad(f"h{i}", cpus=2, memory_total_mib=16 * GIB)
        for _ in range(n):
            h.add(128, 1)
        out.append(h)
    return out


def test_a_vcpu_bound_violation_names_vcpus_with_numbers() -> None:
    loads = _lab(6, 6, 5)  # 17 one-vCPU VMs; two hosts take at most 2 x 8
    placed = {"h1": [Request(f"v{i}", 128, 1) for i in range(6)]}
    why = n_plus_one_violation(loads, placed, 4)
    assert why is not None
    assert "vCPU" in why and "8 of 8" in why and "2 CPUs" in why and "4:1" in why, why
    assert "MiB free" not in why, why  # memory is plentiful: it is not named as the reason


def test_a_memory_bound_violation_names_memory_with_numbers() -> None:
    loads = hosts(12 * GIB, 12 * GIB)
    placed = {"h1": [Request("emr", 12 * GIB, 1)]}
    why = n_plus_one_violation(loads, placed, 4)
    assert why is not None and "memory" in why and f"{12 * GIB + VM_OVERHEAD_MIB} MiB" in why, why
    assert "vCPUs in use" not in why, why
