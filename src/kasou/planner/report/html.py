"""The HTML page of a plan: one self-contained file (inline CSS and SVG, nothing fetched)."""

from __future__ import annotations

from html import escape
from typing import Any

from kasou.planner.report.charts import Chart

_CSS = """
body{font-family:Helvetica,Arial,"Noto Sans CJK JP","IPAexGothic",sans-serif;color:#222;max-width:980px;
margin:2em auto;padding:0 1em;line-height:1.45}
h1{font-size:1.6em;margin-bottom:.2em} h2{margin-top:1.8em;border-bottom:1px solid #ddd}
.muted{color:#666} .key{font-size:1.1em} .key b{font-size:1.25em}
table{border-collapse:collapse;margin:.6em 0;font-size:.9em} th,td{border-bottom:1px solid #e5e5e5;padding:.25em .6em}
th{text-align:left;background:#f4f4f4} td.n{text-align:right;font-variant-numeric:tabular-nums}
svg{max-width:100%;height:auto;display:block;margin:.8em 0}
@page{size:A4;margin:16mm 14mm}
@media print{body{margin:0;max-width:none;font-size:10pt} h2{break-before:auto} svg{break-inside:avoid}
tr{break-inside:avoid}}
"""


def _m(v: float) -> str:
    return f"{v / 1e6:,.1f}"


def _table(head: list[str], rows: list[list[str]], numeric: set[int] | None = None) -> str:
    numeric = numeric or set()
    th = "".join(f"<th>{escape(h)}</th>" for h in head)
    body = "".join(
        "<tr>" + "".join(f'<td class="n">{escape(c)}</td>' if i in numeric else f"<td>{escape(c)}</td>"
                         for i, c in enumerate(r)) + "</tr>"
        for r in rows
    )  # fmt: skip
    return f"<table><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>"


def render_html(plan: dict[str, Any], charts: dict[str, Chart]) -> str:
    m, s, c, a = plan["host_model"], plan["solver"], plan["costs"], plan["availability"]
    years = list(range(1, c["years"] + 1))
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>kasou plan: {escape(plan['inventory'])}</title><style>{_CSS}</style></head><body>",
        "<h1>kasou consolidation plan</h1>",
        f'<p class="muted">inventory {escape(plan["inventory"])}: {plan["servers"]} physical servers; '
        f"reserve {escape(plan['reserve'])}; cycle {c['years']} years</p>",
        f'<p class="key"><b>{plan["host_count"]}</b> hosts of {escape(m["name"])} ({m["cores"]} cores, '
        f"{m['memory_gib']} GiB) replace {plan['servers']} servers. Lower bound: <b>{plan['lower_bound_hosts']}</b> "
        f"hosts; the plan is {plan['gap_hosts']} above it ({plan['gap_pct']} %).</p>",
        f'<p class="key">Cost over {c["years"]} years: before <b>{_m(c["before_total_yen"])}</b> million yen, after '
        f"<b>{_m(c['after_total_yen'])}</b> million yen: saving {_m(c['saving_yen'])} million yen "
        f"({c['saving_pct']} %).</p>",
        f"<p>Solver: {escape(s['name'])}, {escape(s['status'])} in {s['seconds']} s ({s['packed_hosts']} hosts "
        f"carry the VMs; packing lower bound {s['packing_lower_bound']}). Placement: {escape(s['placement'])}. "
        "The lower bound is sound: after the reserve's hosts fail, every VM must run on the others, so no plan "
        "can use fewer.</p>",
        "<h2>Cost over time</h2>",
        charts["cost"].svg(),
        _table(
            ["", *[f"year {y}" for y in years], "total"],
            [[f"before: {ln['item']}", *[_m(v) for v in ln["per_year"]], _m(ln["total"])] for ln in c["before"]]
            + [["before, total", *[_m(v) for v in c["before_per_year"]], _m(c["before_total_yen"])]]
            + [[f"after: {ln['item']}", *[_m(v) for v in ln["per_year"]], _m(ln["total"])] for ln in c["after"]]
            + [["after, total", *[_m(v) for v in c["after_per_year"]], _m(c["after_total_yen"])]],
            numeric=set(range(1, len(years) + 2)),
        ),
        '<p class="muted">million yen. Power: '
        f"{c['power_before_w']:,} W before, {c['power_after_w']:,} W after (IT load); rack units "
        f"{c['rack_u_before']} before, {c['rack_u_after']} after; storage {c['storage_tib']} TiB after.</p>",
        "<h2>Host models considered</h2>",
        _table(
            ["model", "hosts", "status", "cost after (M yen)", "solve s", "chosen"],
            [
                [
                    x["model"],
                    str(x.get("hosts", "-")),
                    x.get("status", x.get("reason", "")),
                    _m(x["after_total_yen"]) if "after_total_yen" in x else "-",
                    str(x.get("solve_s", "-")),
                    "yes" if x.get("chosen") else "",
                ]
                for x in plan["models_considered"]
            ],
            numeric={1, 3, 4},
        ),
        "<h2>Hosts and their VMs</h2>",
        charts["utilisation"].svg(),
        _table(
            ["host", "role", "memory", "CPU peak", "CPU avg", "vCPUs", "VMs"],
            [
                [
                    h["name"],
                    h["role"],
                    f"{h['use']['memory']:.0%}",
                    f"{h['use']['cpu']:.0%}",
                    f"{h['use']['cpu_avg']:.0%}",
                    f"{h['use']['vcpus']:.0%}",
                    ", ".join(
                        f"{v['name']} ({v['department']}, {v['vcpus']} vCPU, {v['memory_mib'] // 1024} GiB)"
                        for v in h["vms"]
                    )
                    or "empty: failover reserve",
                ]
                for h in plan["hosts"]
            ],
            numeric={2, 3, 4, 5},
        ),
        "<h2>Availability</h2>",
        f"<p>{a['runs']} Monte Carlo runs over {a['years']} years (seed {a['seed']}). Minutes of downtime a year per "
        f"system, counted while the system is needed. Planned stops avoided by live migration: "
        f"<b>{a['planned_stops_avoided']}</b> ({a['planned_stops_before']} planned stops before, "
        f"{a['planned_stops_after']} after: guest OS patch reboots remain).</p>",
        _table(
            [
                "criticality",
                "systems",
                "before mean",
                "before p95",
                "after mean",
                "after p95",
                "after p99",
                "runs with no unplanned stop (before / after)",
            ],
            [
                [
                    k,
                    str(e["systems"]),
                    f"{e['before']['mean_min_per_year']:.1f}",
                    f"{e['before']['p95_min_per_year']:.1f}",
                    f"{e['after']['mean_min_per_year']:.1f}",
                    f"{e['after']['p95_min_per_year']:.1f}",
                    f"{e['after']['p99_min_per_year']:.1f}",
                    f"{e['before']['no_unplanned_stop_pct']} % / {e['after']['no_unplanned_stop_pct']} %",
                ]
                for k, e in a["classes"].items()
            ],
            numeric={1, 2, 3, 4, 5, 6},
        ),
        *[ch.svg() for key, ch in charts.items() if key.startswith("downtime:")],
        "<h2>Assumptions</h2><h3>Costs</h3><ul>",
        *[f"<li>{escape(t)}</li>" for t in plan["assumptions"]["costs"]],
        "</ul><h3>Availability</h3><ul>",
        *[f"<li>{escape(t)}</li>" for t in plan["assumptions"]["availability"]],
        "</ul>",
        '<p class="muted">Made by <code>kasou plan</code>. docs/planner.md explains the method. The figures are '
        "estimates from the inventory and the price sheet; change either and plan again.</p>",
        "</body></html>",
    ]
    return "\n".join(parts)
