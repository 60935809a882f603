"""Expected downtime before and after, by Monte Carlo over the cycle (numpy, seeded).

Before, each physical server: hardware failures (MTBF growing worse past an age, the server
replaced at the cycle's age) each down for a repair time (exponential, mean MTTR); a RAID-1 pair
of drives that loses data only if the second fails within the rebuild window (then a restore);
planned stops for hardware maintenance and reboots for OS patches.

After, each host: failures as above; the VMs of a failed host are restarted elsewhere by kasou's HA
(down for the detection and fence wait plus the guest's boot) unless more hosts than the
reserve are down at that moment, when they wait for the repair. Disks are two copies (mirrored or
replicated) with a shorter rebuild window. Host maintenance moves VMs by live migration: no stop.
OS patches still reboot the guest (shorter than a physical reboot).

Downtime counts only while a system is needed: all of it for 24h-clinical systems, the
business-hours and batch shares of the week for the others (planned work on those is scheduled
outside their hours, so it costs them nothing either way).

The detection and fence wait (:func:`failover`) is, in this order: ``failover_s`` of the price
sheet if it sets one; else the median ``to_restart`` that ``bench/failover.py`` recorded in
``bench/results/failover.json`` of the source tree (labelled measured, with its date and run
count); else an assumption derived from kasou's default HA times, labelled as such.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from kasou.config import HaTimes
from kasou.model.criticality import BATCH, BUSINESS_HOURS, CLINICAL_24H, CRITICALITIES
from kasou.planner.inventory import Server
from kasou.planner.prices import Availability

HOURS_PER_YEAR = 8760.0

#: What bench/failover.py records (in a source tree; an installed kasou has none and assumes).
FAILOVER_RESULT = Path(__file__).resolve().parents[3] / "bench" / "results" / "failover.json"
#: Without a recorded run: the lease TTL, the fence margin, and about 1 s of expiry and host checks
#: (docs/architecture.md, "Why these numbers").
_HA = HaTimes()
ASSUMED_FAILOVER_S = _HA.lease_ttl_s + _HA.fence_margin_s + 1.0


@dataclass(frozen=True)
class Failover:
    """The detection and fence wait after a host failure, and how it is known."""

    seconds: float
    source: str
    measured: bool


def _shown(path: Path) -> str:
    return "bench/results/failover.json" if path == FAILOVER_RESULT else str(path)


def failover(a: Availability, result: Path = FAILOVER_RESULT) -> Failover:
    """From the price sheet if it sets ``failover_s``, else the recorded bench result, else assumed."""
    if a.failover_s is not None:
        return Failover(a.failover_s, "from the price sheet (failover_s)", measured=False)
    assumed = (
        f"an assumption, not measured: lease TTL {_HA.lease_ttl_s:g} s + fence margin {_HA.fence_margin_s:g} s "
        "+ 1 s of checks"
    )
    try:
        data = json.loads(result.read_text())
        seconds = float(data["median_s"]["to_restart"])
        if not 0 < seconds < 3600:
            raise ValueError(seconds)
    except FileNotFoundError:
        return Failover(ASSUMED_FAILOVER_S, f"{assumed} (no {_shown(result)}; run bench/failover.py)", False)
    except (OSError, ValueError, KeyError, TypeError) as e:
        return Failover(ASSUMED_FAILOVER_S, f"{assumed} ({_shown(result)} is unusable: {e!r})", False)
    when = str(data.get("recorded") or "?")[:10]
    how = ", ".join(str(x) for x in (data.get("accelerator"), data.get("commit") and f"commit {data['commit']}") if x)
    source = (
        f"measured: median of {data.get('kills', '?')} host kills, bench/failover.py, {when}"
        f"{f' ({how})' if how else ''}, {_shown(result)}"
    )
    return Failover(seconds, source, measured=True)


def restart_seconds(a: Availability, result: Path = FAILOVER_RESULT) -> float:
    """How long a failed host's VMs are down when they restart elsewhere: failover and boot."""
    return failover(a, result).seconds + a.guest_boot_s


def _share(crit: str, a: Availability) -> float:
    return {CLINICAL_24H: 1.0, BUSINESS_HOURS: a.business_hours_share, BATCH: a.batch_share}[crit]


def _age_factor(age: np.ndarray, a: Availability) -> np.ndarray:
    return np.asarray(1.0 + a.aging_per_year * np.maximum(0.0, age - a.aging_after_years))


def _server_rate(ages0: np.ndarray, years: int, mtbf_h: float, a: Availability) -> np.ndarray:
    """Expected failures over the cycle per server (its age each year; replaced at the cycle's age)."""
    total = np.zeros_like(ages0, dtype=float)
    for y in range(years):
        age = ages0 + y
        replaced_at = np.where(ages0 >= years, 0.0, years - ages0)  # years from now when it is replaced
        age = np.where(y >= np.floor(replaced_at), y - np.floor(replaced_at), age)
        total += HOURS_PER_YEAR / mtbf_h * _age_factor(age, a)
    return total


def _disk_losses(rng: np.random.Generator, shape: tuple[int, int], years: int, a: Availability,
                 rebuild_h: float) -> np.ndarray:  # fmt: skip
    """Data losses of a two-copy disk: a first failure, then the other copy within the rebuild window."""
    firsts = rng.poisson(2 * a.disk_afr * years, size=shape)
    p_second = 1.0 - np.exp(-a.disk_afr / HOURS_PER_YEAR * rebuild_h)
    return np.asarray(rng.binomial(firsts, p_second))


def _gamma_sum(rng: np.random.Generator, counts: np.ndarray, mean: float) -> np.ndarray:
    """The sum of ``counts`` exponential durations of mean ``mean``, elementwise."""
    out = np.zeros(counts.shape)
    nz = counts > 0
    out[nz] = rng.gamma(counts[nz], mean)
    return out


def simulate(
    servers: Sequence[Server],
    host_of: Sequence[int],
    n_hosts: int,
    reserve: int,
    years: int,
    a: Availability,
    runs: int | None = None,
    seed: int = 1,
) -> dict[str, Any]:
    """Yearly downtime per criticality class, before and after. ``host_of[i]`` is the host of server i's VM."""
    t0 = time.perf_counter()
    runs = runs or a.runs
    rng = np.random.default_rng(seed)
    n = len(servers)
    crit = [s.criticality for s in servers]
    share = np.array([_share(c, a) for c in crit])
    is24 = np.array([c == CLINICAL_24H for c in crit])
    hosts = np.asarray(host_of, dtype=int)

    # -- before: physical servers ------------------------------------------------------------
    ages = np.array([s.age_years for s in servers], dtype=float)
    hw = rng.poisson(_server_rate(ages, years, a.server_mtbf_h, a), size=(runs, n))
    repair = _gamma_sum(rng, hw, a.server_mttr_h)
    lost = _disk_losses(rng, (runs, n), years, a, a.raid_rebuild_h)
    planned_before = years * (a.hw_stops_per_year * a.hw_stop_h + a.os_reboots_per_year * a.physical_reboot_min / 60)
    before = (repair + lost * a.restore_h) * share + np.where(is24, planned_before, 0.0)
    unplanned_before = hw + lost

    # -- after: hosts, HA restarts, the reserve ------------------------------------------------
    host_rate = float(_server_rate(np.zeros(1), years, a.host_mtbf_h, a)[0])
    counts = rng.poisson(host_rate, size=(runs, n_hosts))
    e_max = int(counts.max(initial=0))
    restart_n = np.zeros((runs, n_hosts))
    wait_h = np.zeros((runs, n_hosts))
    if e_max:
        # The events of each run, packed to the left of a [runs, e_run] array (e_run: most events in one run).
        per_run = counts.sum(axis=1)
        e_run = int(per_run.max())
        valid_slots = (np.arange(e_max)[None, None, :] < counts[:, :, None]).reshape(runs, n_hosts * e_max)
        r_of, slot = np.nonzero(valid_slots)  # row-major: grouped by run
        pos = np.arange(r_of.size) - np.repeat(np.cumsum(per_run) - per_run, per_run)
        host_idx = np.full((runs, e_run), -1)
        host_idx[r_of, pos] = slot // e_max
        valid = host_idx >= 0
        start = np.where(valid, rng.uniform(0, years * HOURS_PER_YEAR, size=(runs, e_run)), np.inf)
        dur = np.where(valid, rng.exponential(a.host_mttr_h, size=(runs, e_run)), 0.0)
        # For each event, how many failures of other hosts are under repair when it starts.
        others: np.ndarray = np.zeros((runs, e_run), dtype=int)
        chunk = max(1, 4_000_000 // max(1, e_run * e_run))
        for lo in range(0, runs, chunk):
            hi = min(runs, lo + chunk)
            s_i = start[lo:hi, :, None]
            s_j, e_j = start[lo:hi, None, :], (start + dur)[lo:hi, None, :]
            overlap = (s_j <= s_i) & (s_i < e_j) & (host_idx[lo:hi, None, :] != host_idx[lo:hi, :, None])
            others[lo:hi] = overlap.sum(axis=2)
        waits = valid & (others >= reserve)
        restarts = valid & ~waits
        r_idx = np.repeat(np.arange(runs), e_run).reshape(runs, e_run)
        np.add.at(restart_n, (r_idx[restarts], host_idx[restarts]), 1)
        np.add.at(wait_h, (r_idx[waits], host_idx[waits]), dur[waits])
    restart_s = restart_seconds(a)
    restart_h = restart_s / 3600
    host_down = restart_n * restart_h + wait_h  # [runs, hosts]: hours each VM of the host is down
    lost_after = _disk_losses(rng, (runs, n), years, a, a.mirror_rebuild_h)
    planned_after = years * a.os_reboots_per_year * a.vm_reboot_min / 60
    after = (host_down[:, hosts] + lost_after * a.restore_h) * share + np.where(is24, planned_after, 0.0)
    unplanned_after = restart_n[:, hosts] + (wait_h[:, hosts] > 0) + lost_after

    classes: dict[str, Any] = {}
    for c in CRITICALITIES:
        mask = np.array([x == c for x in crit])
        if not mask.any():
            continue
        entry: dict[str, Any] = {"systems": int(mask.sum())}
        for label, data, unplanned in (("before", before, unplanned_before), ("after", after, unplanned_after)):
            per_year_min = data[:, mask] / years * 60  # minutes a year, per system and run
            entry[label] = {
                "mean_min_per_year": round(float(per_year_min.mean()), 2),
                "p50_min_per_year": round(float(np.percentile(per_year_min, 50)), 2),
                "p95_min_per_year": round(float(np.percentile(per_year_min, 95)), 2),
                "p99_min_per_year": round(float(np.percentile(per_year_min, 99)), 2),
                "availability_pct": round(100 * (1 - float(per_year_min.mean()) / (HOURS_PER_YEAR * 60)), 5),
                "no_unplanned_stop_pct": round(100 * float((unplanned[:, mask].sum(axis=1) == 0).mean()), 1),
                "histogram": _histogram(per_year_min),
            }
        classes[c] = entry
    seconds = time.perf_counter() - t0
    return {
        "runs": runs,
        "seed": seed,
        "years": years,
        "classes": classes,
        "planned_stops_before": round(n * years * (a.hw_stops_per_year + a.os_reboots_per_year)),
        "planned_stops_after": round(n * years * a.os_reboots_per_year),
        "planned_stops_avoided": round(n * years * a.hw_stops_per_year),
        "expected_host_failures": round(host_rate * n_hosts, 2),
        "expected_server_failures": round(float(hw.mean(axis=0).sum()), 2),
        "restart_s": restart_s,
        "seconds": round(seconds, 3),
        "runs_per_s": round(runs / seconds) if seconds > 0 else None,
    }


# Fixed bin edges (minutes a year) so before and after share one axis.
HIST_EDGES = (0, 1, 5, 15, 30, 60, 120, 240, 480, 960, float("inf"))


def _histogram(values: np.ndarray) -> list[float]:
    counts, _ = np.histogram(values, bins=np.array(HIST_EDGES))
    return [round(float(c) / values.size, 4) for c in counts]


def assumptions(a: Availability, result: Path = FAILOVER_RESULT) -> list[str]:
    f = failover(a, result)
    return [
        f"{a.runs} Monte Carlo runs over the cycle (seeded: the same inputs give the same figures).",
        f"Physical servers and hosts: MTBF {a.server_mtbf_h:,.0f} h / {a.host_mtbf_h:,.0f} h, {a.aging_per_year:.0%} "
        f"more failures per year of age past {a.aging_after_years:g} years; repair {a.server_mttr_h:g} h on average.",
        f"Drives: {a.disk_afr:.1%} a year; data lost only if the second copy fails within the rebuild "
        f"({a.raid_rebuild_h:g} h physical RAID-1, {a.mirror_rebuild_h:g} h kasou mirror), then {a.restore_h:g} h "
        "restore.",
        f"kasou HA restart: {f.seconds:g} s detection and fence wait ({f.source}) + "
        f"{a.guest_boot_s:g} s guest and application start; a failure beyond the reserve waits for the repair.",
        f"Planned: {a.hw_stops_per_year:g} hardware stop(s) a year of {a.hw_stop_h:g} h per physical server, none "
        f"after (live migration); {a.os_reboots_per_year:g} OS patch reboots a year, {a.physical_reboot_min:g} min "
        f"physical, {a.vm_reboot_min:g} min VM.",
        f"Counted while needed: 24h-clinical always, business-hours {a.business_hours_share:.0%} and batch "
        f"{a.batch_share:.0%} of the time; their planned work falls outside their hours.",
    ]
