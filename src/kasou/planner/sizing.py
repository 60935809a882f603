"""From a measured physical server to a VM's size, and from a host model to what a host can carry.

kasou's placement rules (``kasou.control.scheduler``), repeated here because the planner may not
import the control plane (a unit test checks the two agree): a VM takes its memory plus
:data:`VM_OVERHEAD_MIB` for QEMU itself, a host keeps :func:`host_reserve_mib` for its own system,
memory is never overcommitted, vCPUs at most ``vcpu_ratio`` per core.

The planner adds two dimensions the scheduler does not see: the CPU the VMs really use at their
peaks (in host cores, scaled by clock, planned at most ``cpu_target`` busy) and disk IOPS.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from kasou.model.spec import MAX_VCPUS
from kasou.planner.inventory import Server
from kasou.planner.prices import HostModel, Policy

VM_OVERHEAD_MIB = 96
DIMENSIONS = ("memory", "vcpus", "cpu", "iops")


def host_reserve_mib(total_mib: int) -> int:
    """Memory kept for the host's own system and kasou's services: 5 %, at least 512 MiB."""
    return max(512, total_mib // 20)


@dataclass(frozen=True)
class VM:
    """The VM that replaces one physical server, sized for one host model."""

    name: str
    department: str
    criticality: str
    vcpus: int
    memory_mib: int
    cpu_peak_cc: int  # centi-cores of the host model at the VM's peak (with headroom)
    cpu_avg_cc: int  # centi-cores on average
    iops: int
    disk_gib: float
    group: str | None

    @property
    def size(self) -> tuple[int, int, int, int]:
        """What it takes of a host, per dimension: memory with overhead, vCPUs, peak CPU, IOPS."""
        return (self.memory_mib + VM_OVERHEAD_MIB, self.vcpus, self.cpu_peak_cc, self.iops)


def capacity(model: HostModel, policy: Policy) -> tuple[int, int, int, int]:
    """What one host of ``model`` carries, per dimension (same order as :attr:`VM.size`)."""
    total = model.memory_gib * 1024
    return (
        total - host_reserve_mib(total),
        math.floor(model.cores * policy.vcpu_ratio),
        math.floor(model.cores * policy.cpu_target * 100),
        model.iops,
    )


def size_vm(server: Server, model: HostModel, policy: Policy) -> VM:
    """The VM for ``server`` on hosts of ``model``: peaks plus headroom, or as-is without right-sizing."""
    h = 1 + policy.headroom
    if policy.rightsize:
        want = math.ceil(server.cores * server.cpu_peak_pct / 100 * h - 1e-9)
        vcpus = min(max(want, policy.min_vcpus), max(server.cores, policy.min_vcpus))
        gib = math.ceil(server.memory_gib * server.mem_peak_pct / 100 * h - 1e-9)
        gib = min(max(gib, policy.min_memory_gib), max(math.ceil(server.memory_gib), policy.min_memory_gib))
    else:
        vcpus = server.cores
        gib = max(math.ceil(server.memory_gib), 1)
    vcpus = min(vcpus, MAX_VCPUS)
    scale = server.cores * server.clock_ghz / model.clock_ghz
    peak = min(scale * server.cpu_peak_pct / 100 * h, float(vcpus))
    avg = min(scale * server.cpu_avg_pct / 100, float(vcpus))
    return VM(
        name=server.name,
        department=server.department,
        criticality=server.criticality,
        vcpus=vcpus,
        memory_mib=gib * 1024,
        cpu_peak_cc=max(1, math.ceil(peak * 100 - 1e-9)),
        cpu_avg_cc=max(0, math.ceil(avg * 100 - 1e-9)),
        iops=server.iops,
        disk_gib=server.disk_gib,
        group=server.anti_affinity,
    )


def why_too_big(vm: VM, cap: tuple[int, ...]) -> str | None:
    """Why ``vm`` cannot fit on an empty host of capacity ``cap``, or None."""
    for dim, need, have in zip(DIMENSIONS, vm.size, cap, strict=True):
        if need > have:
            return f"{vm.name} needs {need} of {dim}, a host has {have}"
    return None
