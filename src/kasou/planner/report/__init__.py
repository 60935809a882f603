"""The plan as a report a person reads: an HTML page with inline SVG charts, and the same page as a PDF.

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


def render_pdf(plan: dict[str, Any]) -> bytes:
    """The HTML page printed to A4 by WeasyPrint (HarfBuzz and Pango: any script, Japanese included, drawn with the
    machine's fonts; Debian's ``fonts-noto-cjk`` for Japanese). The same page as the HTML report, with its charts."""
    try:
        from weasyprint import HTML
    except (ImportError, OSError) as e:  # OSError: Pango, its system library, is missing
        why = f"cannot print the report to PDF: WeasyPrint is not usable here ({e})"
        raise InvalidSpec(f"{why}; it comes with pip install 'kasou[planner]' and Debian's libpango-1.0-0",
                          field="report") from None  # fmt: skip
    return bytes(HTML(string=render_html(plan, charts(plan))).write_pdf())


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
