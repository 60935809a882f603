"""Total cost of ownership over the replacement cycle: the physical servers as they are ("before")
against kasou hosts ("after"), per year, in yen.

Costs that are the same either way (the department applications' licences and their vendors'
application maintenance, clients, the hospital network) are left out of both.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from kasou.planner.inventory import Server
from kasou.planner.prices import HostModel, PriceSheet
from kasou.planner.sizing import VM

HOURS_PER_YEAR = 8760


@dataclass(frozen=True)
class HostUse:
    """One planned host's average CPU use (for its power draw)."""

    cpu_avg: float  # share of its cores, 0..1


def replacement_price(s: Server, prices: PriceSheet) -> float:
    if s.replacement_yen is not None:
        return float(s.replacement_yen)
    m = prices.maintenance
    return (m.physical_base_yen + m.physical_per_core_yen * s.cores + m.physical_per_gib_yen * s.memory_gib
            + m.physical_per_tib_yen * s.disk_gib / 1024)  # fmt: skip


def replacement_year(s: Server, years: int) -> int | None:
    """The year of the cycle (1-based) in which a physical server reaches the cycle's age and is replaced."""
    due = max(0.0, years - s.age_years)
    year = math.floor(due) + 1
    return year if year <= years else None


def storage_tib(vms: Sequence[VM], prices: PriceSheet) -> float:
    st = prices.storage
    return sum(v.disk_gib for v in vms) / 1024 * st.copies / (1 - st.free_margin)


def tco(servers: Sequence[Server], vms: Sequence[VM], model: HostModel, hosts: Sequence[HostUse],
        prices: PriceSheet) -> dict[str, Any]:  # fmt: skip
    """Before and after, per year and in total, with every line and the assumptions behind it."""
    years = prices.cycle.years
    pw, sw, mt = prices.power, prices.software, prices.maintenance
    kwh_yen = HOURS_PER_YEAR / 1000 * pw.yen_per_kwh * pw.pue  # yen per watt of constant draw per year
    n_hosts = len(hosts)
    tib = storage_tib(vms, prices)

    def per_year(value: float) -> list[float]:
        return [value] * years

    replace = [0.0] * years
    for s in servers:
        y = replacement_year(s, years)
        if y is not None:
            replace[y - 1] += replacement_price(s, prices)
    before: list[tuple[str, list[float]]] = [
        ("server replacement at end of life", replace),
        ("hardware maintenance", per_year(sum(s.maint_yen_per_year for s in servers))),
        ("power and cooling", per_year(sum(s.power_w for s in servers) * kwh_yen)),
        ("rack space", per_year(sum(s.rack_u for s in servers) * prices.rack.yen_per_u_per_year)),
        ("server OS licences", per_year(len(servers) * sw.os_per_server_yen_per_year)),
    ]
    host_w = sum(model.idle_w + (model.max_w - model.idle_w) * min(1.0, h.cpu_avg) for h in hosts)
    net = prices.network
    it_w = host_w + net.switches * net.switch_w + tib * prices.storage.watts_per_tib
    capex = [0.0] * years
    capex[0] = n_hosts * model.price_yen + net.switches * net.switch_price_yen + tib * prices.storage.yen_per_tib
    migration = [0.0] * years
    migration[0] = len(servers) * mt.migration_per_server_yen
    after: list[tuple[str, list[float]]] = [
        ("hosts, switches and storage (purchase)", capex),
        ("moving each system into a VM (one-off)", migration),
        ("hardware maintenance", per_year(mt.host_rate_per_year * (n_hosts * model.price_yen
                                                                   + net.switches * net.switch_price_yen))),
        ("power and cooling", per_year(it_w * kwh_yen)),
        ("rack space", per_year((n_hosts * model.rack_u + net.switches) * prices.rack.yen_per_u_per_year)),
        ("guest OS licences", per_year(len(vms) * sw.os_per_vm_yen_per_year)),
        ("platform licence and support", per_year(n_hosts * (sw.platform_per_host_yen_per_year
                                                             + sw.support_per_host_yen_per_year))),
        ("backup", per_year(sw.backup_yen_per_year)),
    ]  # fmt: skip
    b_year = [sum(v[y] for _, v in before) for y in range(years)]
    a_year = [sum(v[y] for _, v in after) for y in range(years)]
    b_total, a_total = sum(b_year), sum(a_year)
    return {
        "years": years,
        "before": [{"item": k, "per_year": [round(x) for x in v], "total": round(sum(v))} for k, v in before],
        "after": [{"item": k, "per_year": [round(x) for x in v], "total": round(sum(v))} for k, v in after],
        "before_per_year": [round(x) for x in b_year],
        "after_per_year": [round(x) for x in a_year],
        "before_total_yen": round(b_total),
        "after_total_yen": round(a_total),
        "saving_yen": round(b_total - a_total),
        "saving_pct": round(100 * (b_total - a_total) / b_total, 1) if b_total else 0.0,
        "storage_tib": round(tib, 1),
        "power_before_w": round(sum(s.power_w for s in servers)),
        "power_after_w": round(it_w),
        "rack_u_before": sum(s.rack_u for s in servers),
        "rack_u_after": n_hosts * model.rack_u + net.switches,
    }


def assumptions(prices: PriceSheet) -> list[str]:
    """The assumptions behind the figures, in words, for the report."""
    p, pw, st, sw, mt = prices.policy, prices.power, prices.storage, prices.software, prices.maintenance
    return [
        f"Cycle of {prices.cycle.years} years; yen, tax excluded; no discounting or inflation.",
        "Application licences, the vendors' application maintenance, clients and the hospital network cost the "
        "same before and after and are left out.",
        f"Before: each physical server is replaced when it reaches {prices.cycle.years} years (its replacement_yen, "
        f"or {mt.physical_base_yen:,.0f} + {mt.physical_per_core_yen:,.0f}/core + {mt.physical_per_gib_yen:,.0f}/GiB "
        f"+ {mt.physical_per_tib_yen:,.0f}/TiB); its maintenance contract, power and rack space continue.",
        f"After: hosts, {prices.network.switches} switches and storage are bought in year 1; hardware maintenance "
        f"{mt.host_rate_per_year:.0%} of their price a year; each system moved by its vendor for "
        f"{mt.migration_per_server_yen:,.0f} yen.",
        f"Storage: every disk in {st.copies} copies, {st.free_margin:.0%} kept free, "
        f"{st.yen_per_tib:,.0f} yen per TiB.",
        f"Power {pw.yen_per_kwh:g} yen/kWh, PUE {pw.pue:g} (cooling and UPS); a host draws idle + (max - idle) x its "
        "average CPU use.",
        f"Rack space {prices.rack.yen_per_u_per_year:,.0f} yen per U per year.",
        f"Software: OS {sw.os_per_server_yen_per_year:,.0f} yen/server/year before, {sw.os_per_vm_yen_per_year:,.0f} "
        f"yen/VM/year after; kasou's licence {sw.platform_per_host_yen_per_year:,.0f} yen/host/year "
        f"(Apache-2.0), support {sw.support_per_host_yen_per_year:,.0f} yen/host/year, backup "
        f"{sw.backup_yen_per_year:,.0f} yen/year.",
        f"Sizing: measured peaks + {p.headroom:.0%} headroom; hosts planned at most {p.cpu_target:.0%} CPU busy with "
        f"every VM at its peak at once; vCPUs at most {p.vcpu_ratio:g} per core; memory never overcommitted "
        "(plus 96 MiB per VM for QEMU and 5 % of each host for itself, as kasou places VMs).",
    ]
