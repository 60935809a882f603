from __future__ import annotations

import time

import pytest

from kasou.control.scheduler import VM_OVERHEAD_MIB, HostLoad, Placer, Request, place, place_new, why_not
from kasou.errors import InsufficientResources


def hosts() -> list[HostLoad]:
    return [HostLoad("h1", 8, 16384), HostLoad("h2", 8, 32768), HostLoad("h3", 8, 8192)]


def test_most_free_memory_wins() -> None:
    assert place(Request("a", 1024, 1), hosts()).name == "h2"


def test_refusal_names_the_largest_free_host() -> None:
    with pytest.raises(InsufficientResources) as e:
        place(Request("big", 64000, 1), hosts())
    assert "largest free: h2" in e.value.message
    assert f"{64000 + VM_OVERHEAD_MIB} MiB" in e.value.message


def test_anti_affinity() -> None:
    hs = [HostLoad("h1", 8, 16384), HostLoad("h2", 8, 16384)]
    first = place(Request("db1", 1024, 1, group="emr-db"), hs)
    first.add(1024, 1, "emr-db")
    second = place(Request("db2", 1024, 1, group="emr-db"), hs)
    assert second.name != first.name
    second.add(1024, 1, "emr-db")
    with pytest.raises(InsufficientResources) as e:
        place(Request("db3", 1024, 1, group="emr-db"), hs)
    assert "anti-affinity" in e.value.message


def test_vcpu_overcommit_ratio() -> None:
    h = HostLoad("h1", 2, 1 << 20)
    h.vcpus_used = 8
    assert why_not(h, Request("x", 128, 1)) is not None
    assert why_not(h, Request("x", 128, 1), vcpu_ratio=5) is None


def test_maintenance_hosts_take_nothing() -> None:
    hs = hosts()
    for h in hs:
        h.schedulable = False
    with pytest.raises(InsufficientResources, match="no host is accepting"):
        place(Request("a", 128, 1), hs)


def test_placer_agrees_with_place_and_is_fast() -> None:
    import random

    rng = random.Random(7)
    reqs = [
        Request(f"vm{i}", rng.choice([512, 1024, 4096]), rng.choice([1, 2, 4]), rng.choice([None, "g1", "g2"]))
        for i in range(300)
    ]
    a = [HostLoad(f"h{i}", 8, rng.choice([16384, 32768])) for i in range(20)]
    b = [HostLoad(h.name, h.cpus, h.memory_total_mib) for h in a]
    placer = Placer(b)
    for r in reqs:
        try:
            ha = place(r, a)
            ha.add(r.memory_mib, r.vcpus, r.group)
        except InsufficientResources:
            with pytest.raises(InsufficientResources):
                placer.place(r)
            continue
        assert placer.place(r).memory_free_mib == ha.memory_free_mib
    hs = [HostLoad(f"h{i}", 32, 262144) for i in range(1000)]
    t0 = time.perf_counter()
    p = Placer(hs)
    for i in range(10000):
        p.place(Request(f"vm{i}", 4096, 2))
    assert time.perf_counter() - t0 < 10  # the benchmark measures the real figure


def test_a_vcpu_refusal_names_vcpus_with_numbers() -> None:
    h = HostLoad("h1", cpus=2, memory_total_mib=16384)
    for _ in range(8):
        h.add(128, 1)
    why = why_not(h, Request("ris", 128, 1))
    assert why is not None and "8 of 8 vCPUs" in why and "2 CPUs" in why and "4:1" in why, why
    with pytest.raises(InsufficientResources) as e:
        place(Request("ris", 128, 1), [h])
    assert "8 of 8 vCPUs" in e.value.message and "MiB free" not in e.value.message, e.value.message


def test_a_new_vm_goes_where_the_fewest_vms_are_defined() -> None:
    """Stopped VMs count when a new one is placed (they will start there), running ones bind (they run now)."""
    same = [HostLoad("h1", 8, 16384), HostLoad("h2", 8, 16384), HostLoad("h3", 8, 16384)]
    assert place_new(Request("a", 1024, 1), same, {}).name == "h1"
    assert place_new(Request("a", 1024, 1), same, {"h1": 4096, "h3": 1024}).name == "h2"
    same[1].add(14000, 1)  # h2 is nearly full of running VMs: it cannot run this one now, however few it has
    assert place_new(Request("a", 1024, 1), same, {"h1": 4096, "h2": 14096, "h3": 1024}).name == "h3"
    with pytest.raises(InsufficientResources, match="no host has"):
        place_new(Request("big", 20000, 1), same, {})
