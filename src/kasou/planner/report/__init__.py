"""The plan as a report a person reads: an HTML page with inline SVG charts, and a printable PDF.

Both are built from the plan dict alone (what ``kasou plan --json`` prints), so a saved plan can
be reported again. ``--report plan.html`` writes ``plan.html`` and ``plan.pdf`` beside it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kasou.errors import InvalidSpec
from kasou.planner.availability import HIST_EDGES
from kasou.planner.report.charts import AFTER, BEFORE, PALETTE, Chart, bar_chart, line_chart
from kasou.planner.report.html import render_html
from kasou.planner.report.pdf import Document, Page


def cost_chart(plan: dict[str, Any]) -> Chart:
    c = plan["costs"]
    cum_b, cum_a, tb, ta = [], [], 0.0, 0.0
    for b, a in zip(c["before_per_year"], c["after_per_year"], strict=True):
        tb, ta = tb + b / 1e6, ta + a / 1e6
        cum_b.append(tb)
        cum_a.append(ta)
    years = [f"year {y}" for y in range(1, c["years"] + 1)]
    return line_chart("Cumulative cost over the cycle (million yen)", years,
                      [("before: physical servers", BEFORE, cum_b), ("after: kasou hosts", AFTER, cum_a)],
                      "million yen")  # fmt: skip


def utilisation_chart(plan: dict[str, Any]) -> Chart:
    hosts = plan["hosts"]
    labels = [h["name"].replace("host-", "h") for h in hosts]
    series = [
        ("memory", PALETTE[0], [100 * h["use"]["memory"] for h in hosts]),
        ("CPU at peaks", PALETTE[1], [100 * h["use"]["cpu"] for h in hosts]),
        ("CPU average", PALETTE[2], [100 * h["use"]["cpu_avg"] for h in hosts]),
        ("vCPUs / limit", PALETTE[3], [100 * h["use"]["vcpus"] for h in hosts]),
    ]
    return bar_chart("Host utilisation (% of what a host may carry)", labels, series, "percent", ymax=100)


def downtime_chart(plan: dict[str, Any], crit: str) -> Chart:
    e = plan["availability"]["classes"][crit]
    edges = list(HIST_EDGES)
    labels = [f"<{int(edges[i + 1])}" if edges[i + 1] != float("inf") else f">={int(edges[i])}"
              for i in range(len(edges) - 1)]  # fmt: skip
    return bar_chart(
        f"{crit}: yearly downtime of a system (share of system-years, minutes a year)", labels,
        [("before", BEFORE, [100 * v for v in e["before"]["histogram"]]),
         ("after", AFTER, [100 * v for v in e["after"]["histogram"]])],
        "percent", ymax=100, height=200,
    )  # fmt: skip


def charts(plan: dict[str, Any]) -> dict[str, Chart]:
    out = {"cost": cost_chart(plan), "utilisation": utilisation_chart(plan)}
    for crit in plan["availability"]["classes"]:
        out[f"downtime:{crit}"] = downtime_chart(plan, crit)
    return out


def _yen(v: float) -> str:
    return f"{v / 1e6:,.1f} M yen"


def render_pdf(plan: dict[str, Any]) -> bytes:
    ch = charts(plan)
    doc = Document()
    m, s, c, a = plan["host_model"], plan["solver"], plan["costs"], plan["availability"]
    p = doc.page()
    p.line("kasou consolidation plan", 18, bold=True)
    p.line(f"inventory {plan['inventory']}: {plan['servers']} physical servers", 10, color="#666666")
    p.y -= 6
    for text in (
        f"{plan['host_count']} hosts of {m['name']} ({m['cores']} cores, {m['memory_gib']} GiB), reserve "
        f"{plan['reserve']}",
        f"Lower bound {plan['lower_bound_hosts']} hosts; the plan is {plan['gap_hosts']} host(s) above it "
        f"({plan['gap_pct']} %). Solver: {s['name']}, {s['status']}, {s['seconds']} s.",
        f"Placement: {s['placement']}.",
        f"Cost over {c['years']} years: before {_yen(c['before_total_yen'])}, after {_yen(c['after_total_yen'])}: "
        f"saving {_yen(c['saving_yen'])} ({c['saving_pct']} %).",
        f"Planned stops avoided by live migration over the cycle: {a['planned_stops_avoided']}.",
    ):
        p.wrapped(text, 10)
    p.y -= 6
    p.chart(ch["cost"])
    _cost_table(p, c)
    p = doc.page()
    p.line("Hosts", 14, bold=True)
    p.chart(ch["utilisation"])
    for h in plan["hosts"]:
        names = ", ".join(v["name"] for v in h["vms"]) or "(empty: failover reserve)"
        p.wrapped(f"{h['name']} ({h['role']}, memory {h['use']['memory']:.0%}, CPU peak {h['use']['cpu']:.0%}): "
                  f"{names}", 8.5)  # fmt: skip
        if p.y < 80:
            p = doc.page()
    p = doc.page()
    p.line("Availability", 14, bold=True)
    p.line(f"{a['runs']} Monte Carlo runs over {a['years']} years (seed {a['seed']}): minutes of downtime a year "
           "per system", 9)  # fmt: skip
    p.line(f"{'class':<16}{'systems':>8}{'before mean':>14}{'before p95':>12}{'after mean':>12}{'after p99':>11}", 8,
           mono=True)  # fmt: skip
    for crit, e in a["classes"].items():
        b, f = e["before"], e["after"]
        p.line(f"{crit:<16}{e['systems']:>8}{b['mean_min_per_year']:>14.1f}{b['p95_min_per_year']:>12.1f}"
               f"{f['mean_min_per_year']:>12.1f}{f['p99_min_per_year']:>11.1f}", 8, mono=True)  # fmt: skip
    for key, chart in ch.items():
        if key.startswith("downtime:"):
            if p.y < 200:
                p = doc.page()
            p.chart(chart, scale=0.85)
    p = doc.page()
    p.line("Assumptions", 14, bold=True)
    for group in ("costs", "availability"):
        p.line(group, 10, bold=True)
        for text in plan["assumptions"][group]:
            p.wrapped("- " + text, 8.5, indent=6)
            if p.y < 70:
                p = doc.page()
    return doc.render(f"kasou plan: {plan['inventory']}")


def _cost_table(p: Page, c: dict[str, Any]) -> None:
    p.line(f"{'million yen over the cycle':<42}{'total':>14}", 8, mono=True)
    for side in ("before", "after"):
        p.line(side, 8, mono=True)
        for line in c[side]:
            p.line(f"  {line['item']:<40}{line['total'] / 1e6:>12,.1f} M", 8, mono=True)
    p.line(f"{'before, total':<42}{c['before_total_yen'] / 1e6:>12,.1f} M", 8, mono=True)
    p.line(f"{'after, total':<42}{c['after_total_yen'] / 1e6:>12,.1f} M", 8, mono=True)


def write_report(plan: dict[str, Any], html_path: str | Path) -> Path:
    """Write the HTML report at ``html_path`` and the PDF beside it; return the PDF's path."""
    path = Path(html_path)
    if path.suffix.lower() == ".pdf":
        raise InvalidSpec("--report takes the HTML file's name (plan.html); the PDF is written beside it")
    pdf = path.with_suffix(".pdf")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(render_html(plan, charts(plan)), encoding="utf-8")
        pdf.write_bytes(render_pdf(plan))
    except OSError as e:
        raise InvalidSpec(f"cannot write the report {path}: {e}", field="report") from None
    return pdf
