from __future__ import annotations

import time

import pytest

from kasou.control.scheduler import VM_OVERHEAD_MIB, HostLoad, Request, place, why_not
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


def test_ten_thousand_vms_on_a_thousand_hosts_quickly() -> None:
    hs = [HostLoad(f"h{i}", 32, 262144) for i in range(1000)]
    t0 = time.perf_counter()
    for i in range(2000):
        h = place(Request(f"vm{i}", 4096, 2), hs)
        h.add(4096, 2)
    assert time.perf_counter() - t0 < 20  # the benchmark measures the real figure
