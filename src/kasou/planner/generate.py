"""Synthetic inventories for benchmarks and tests: seeded, with a published-trace-like size mix.

Public VM traces (Azure 2017/2019, Google 2019) summarise to: most VMs small (1-4 cores, a few
GiB), a long tail of large ones, memory roughly proportional to cores with a lognormal spread,
and low average CPU use with higher peaks. The generator follows those shapes; it does not
reproduce any trace.
"""

from __future__ import annotations

import numpy as np

from kasou.model.criticality import BATCH, BUSINESS_HOURS, CLINICAL_24H
from kasou.planner.inventory import Server

_CORES = np.array([1, 2, 4, 8, 16, 32])
_CORES_P = np.array([0.10, 0.30, 0.30, 0.18, 0.09, 0.03])


def generate_inventory(n: int, seed: int = 1, pair_share: float = 0.1) -> list[Server]:
    """``n`` servers; about ``pair_share`` of them in primary/standby anti-affinity pairs."""
    rng = np.random.default_rng(seed)
    cores = rng.choice(_CORES, size=n, p=_CORES_P)
    gib_per_core = np.clip(rng.lognormal(np.log(4.0), 0.5, size=n), 1.0, 16.0)
    memory = np.clip(np.round(cores * gib_per_core), 1, 1024)
    cpu_peak = np.clip(rng.lognormal(np.log(35), 0.5, size=n), 3, 100)
    cpu_avg = cpu_peak * rng.uniform(0.1, 0.6, size=n)
    mem_peak = np.clip(rng.normal(70, 12, size=n), 20, 98)
    mem_avg = mem_peak * rng.uniform(0.6, 0.95, size=n)
    disk = np.round(np.clip(rng.lognormal(np.log(300), 1.0, size=n), 20, 50000))
    iops = np.round(np.clip(rng.lognormal(np.log(500), 0.9, size=n), 20, 50000))
    crit = rng.choice(np.array([CLINICAL_24H, BUSINESS_HOURS, BATCH]), size=n, p=[0.45, 0.4, 0.15])
    age = rng.integers(0, 9, size=n)
    servers: list[Server] = []
    pairs = int(n * pair_share) // 2
    for i in range(n):
        group = f"pair{i // 2:04d}" if i < 2 * pairs else None
        servers.append(Server(
            name=f"srv{i:05d}", department=f"dept{i % 40:02d}", vendor=f"vendor{i % 25:02d}",
            cores=int(cores[i]), clock_ghz=2.4, memory_gib=float(memory[i]), disk_gib=float(disk[i]),
            iops=int(iops[i]), cpu_peak_pct=round(float(cpu_peak[i]), 1), cpu_avg_pct=round(float(cpu_avg[i]), 1),
            mem_peak_pct=round(float(mem_peak[i]), 1), mem_avg_pct=round(float(mem_avg[i]), 1),
            criticality=str(crit[i]), power_w=float(120 + 12 * cores[i]), age_years=float(age[i]),
            maint_yen_per_year=int(80000 + 15000 * cores[i]), anti_affinity=group, rack_u=1 if cores[i] <= 8 else 2,
        ))  # fmt: skip
    return servers
