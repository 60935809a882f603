"""Placement: which host takes a VM, and why not when none can.

Pure functions over host loads, so they are fast (thousands of hosts) and
tested without any hypervisor. Rules: memory is never overcommitted (plus a
fixed per-VM overhead for QEMU itself and a reserve for the host), vCPUs may
be overcommitted up to a ratio (default 4:1), hosts in maintenance or not up
take nothing, and VMs of one anti-affinity group never share a host.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field
from typing import Any

from kasou.errors import InsufficientResources

# QEMU's own memory beside the guest's RAM (TCG code cache 64 MiB, device state, heap).
VM_OVERHEAD_MIB = 96
DEFAULT_VCPU_RATIO = 4.0


def host_reserve_mib(total_mib: int) -> int:
    """Memory kept for the host's own system and kasou's services: 5 %, at least 512 MiB."""
    return max(512, total_mib // 20)


@dataclass
class HostLoad:
    name: str
    cpus: int
    memory_total_mib: int
    memory_used_mib: int = 0  # by VMs placed here (guest RAM + overhead)
    vcpus_used: int = 0
    schedulable: bool = True  # up, and not in maintenance
    groups: set[str] = field(default_factory=set)  # anti-affinity groups present here

    @property
    def memory_capacity_mib(self) -> int:
        return self.memory_total_mib - host_reserve_mib(self.memory_total_mib)

    @property
    def memory_free_mib(self) -> int:
        return self.memory_capacity_mib - self.memory_used_mib

    def add(self, memory_mib: int, vcpus: int, group: str | None = None) -> None:
        self.memory_used_mib += memory_mib + VM_OVERHEAD_MIB
        self.vcpus_used += vcpus
        if group:
            self.groups.add(group)


@dataclass(frozen=True)
class Request:
    name: str
    memory_mib: int
    vcpus: int
    group: str | None = None  # anti-affinity group

    @classmethod
    def of(cls, vm: Any) -> Request:
        """The request of a stored VM (anything with name, memory_mib, vcpus, anti_affinity)."""
        return cls(vm.name, vm.memory_mib, vm.vcpus, getattr(vm, "anti_affinity", None))


def why_not(host: HostLoad, req: Request, vcpu_ratio: float = DEFAULT_VCPU_RATIO) -> str | None:
    """The reason ``host`` cannot take ``req``, naming the resource that binds with its numbers, or None."""
    if not host.schedulable:
        return f"{host.name} is not accepting VMs (down or in maintenance)"
    need = req.memory_mib + VM_OVERHEAD_MIB
    if need > host.memory_free_mib:
        return f"{host.name} has {max(0, host.memory_free_mib)} MiB of memory free, {req.name} needs {need} MiB"
    if req.vcpus > host.cpus:
        return f"{host.name} has {host.cpus} CPUs, {req.name} wants {req.vcpus} vCPUs"
    vcpu_cap = int(host.cpus * vcpu_ratio)
    if host.vcpus_used + req.vcpus > vcpu_cap:
        return (
            f"{host.name} has {host.vcpus_used} of {vcpu_cap} vCPUs in use "
            f"({host.cpus} CPUs at {vcpu_ratio:g}:1), {req.name} needs {req.vcpus}"
        )
    if req.group and req.group in host.groups:
        return f"{host.name} already runs a VM of anti-affinity group {req.group!r}"
    return None


def place(req: Request, hosts: list[HostLoad], vcpu_ratio: float = DEFAULT_VCPU_RATIO) -> HostLoad:
    """Pick the host with the most free memory that can take ``req``; explain a refusal."""
    best: HostLoad | None = None
    for h in hosts:
        if why_not(h, req, vcpu_ratio) is None and (best is None or h.memory_free_mib > best.memory_free_mib):
            best = h
    if best is not None:
        return best
    raise refusal(req, hosts, vcpu_ratio)


def place_new(
    req: Request, hosts: list[HostLoad], defined: dict[str, int], vcpu_ratio: float = DEFAULT_VCPU_RATIO
) -> HostLoad:
    """The host a new VM is made on: among the hosts that could run it now (every rule of :func:`why_not` on what
    runs there), the one with the most memory left once the VMs already defined there count too, running or not
    (``defined``: MiB per host, overhead included). VMs made stopped and started later (an import, a plan
    applied, a site restored) so spread over the hosts, instead of all landing on the host that is emptiest at
    that moment and not fitting there when they start. Refused as :func:`place` when no host could run it."""
    able = [h for h in hosts if why_not(h, req, vcpu_ratio) is None]
    if not able:
        raise refusal(req, hosts, vcpu_ratio)
    return max(able, key=lambda h: (h.memory_capacity_mib - defined.get(h.name, 0), h.memory_free_mib))


def refusal(req: Request, hosts: list[HostLoad], vcpu_ratio: float = DEFAULT_VCPU_RATIO) -> InsufficientResources:
    """Why none of ``hosts`` can take ``req``: the resource that binds (memory, CPUs, vCPUs, anti-affinity),
    with its numbers; one reason per host when they differ."""
    need = req.memory_mib + VM_OVERHEAD_MIB
    candidates = [h for h in hosts if h.schedulable]
    if not candidates:
        return InsufficientResources(f"no host is accepting VMs (down or in maintenance); {req.name} cannot be placed")
    largest = max(candidates, key=lambda h: h.memory_free_mib)
    if all(need > h.memory_free_mib for h in candidates):
        return InsufficientResources(
            f"no host has {need} MiB of memory free for {req.name} "
            f"({req.memory_mib} MiB + {VM_OVERHEAD_MIB} MiB overhead); "
            f"largest free: {largest.name} {max(0, largest.memory_free_mib)} MiB",
            needed_mib=need,
            largest_free_mib=largest.memory_free_mib,
        )
    reasons = "; ".join(r for h in candidates if (r := why_not(h, req, vcpu_ratio)))
    return InsufficientResources(f"no host can take {req.name}: {reasons}")


class Placer:
    """Many placements in a row (evacuations, planning) in O(log hosts) each.

    Same policy as :func:`place` (most free memory first, every rule checked),
    with the hosts kept in a max-heap on free memory. Each placement is added to
    its host's load.
    """

    def __init__(self, hosts: list[HostLoad], vcpu_ratio: float = DEFAULT_VCPU_RATIO) -> None:
        self.hosts = hosts
        self.vcpu_ratio = vcpu_ratio
        self._heap = [(-h.memory_free_mib, i, h) for i, h in enumerate(hosts) if h.schedulable]
        heapq.heapify(self._heap)

    def place(self, req: Request) -> HostLoad:
        need = req.memory_mib + VM_OVERHEAD_MIB
        skipped = []
        chosen: HostLoad | None = None
        while self._heap:
            neg_free, i, h = heapq.heappop(self._heap)
            if -neg_free != h.memory_free_mib:  # stale entry: its host changed since
                heapq.heappush(self._heap, (-h.memory_free_mib, i, h))
                continue
            if why_not(h, req, self.vcpu_ratio) is None:
                chosen = h
                h.add(req.memory_mib, req.vcpus, req.group)
                heapq.heappush(self._heap, (-h.memory_free_mib, i, h))
                break
            skipped.append((neg_free, i, h))
            if need > h.memory_free_mib:
                break  # the rest have even less free memory
        for entry in skipped:
            heapq.heappush(self._heap, entry)
        if chosen is None:
            raise refusal(req, self.hosts, self.vcpu_ratio)
        return chosen
