"""kasou.planner: the inventory CSV, the price sheet, TCO, the Monte Carlo, the report and the CLI."""

from __future__ import annotations

import json
import re
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
from pypdf import PdfReader
from typer.testing import CliRunner

from kasou.cli import main as cli
from kasou.errors import InvalidSpec
from kasou.planner import (
    InventoryError,
    Options,
    default_prices,
    make_plan,
    parse_inventory,
    parse_prices,
    sample_inventory,
)
from kasou.planner.availability import simulate
from kasou.planner.inventory import COLUMNS, read_inventory, sample_text, to_csv
from kasou.planner.report import write_report
from kasou.planner.tco import replacement_year
from tests.cli_errors import error_of

HEADER = ",".join(c.name for c in COLUMNS)
GOOD = "emr1,EMR,v,8,2.4,32,100,500,50,20,60,40,24h,200,3,100000,,,1"


def test_the_sample_is_a_400_bed_hospital() -> None:
    servers = sample_inventory()
    assert len(servers) == 33
    departments = " ".join(s.department.lower() for s in servers)
    for word in ("emr", "order", "pacs", "radiology", "laboratory", "pathology", "pharmacy", "nutrition",
                 "accounting", "physiological", "endoscopy", "operating"):  # fmt: skip
        assert word in departments, word
    assert {s.criticality for s in servers} == {"24h-clinical", "business-hours", "batch"}
    groups = [s.anti_affinity for s in servers if s.anti_affinity]
    assert groups and all(groups.count(g) == 2 for g in groups)
    again = parse_inventory(to_csv(servers))
    assert [(s.name, s.memory_gib, s.anti_affinity) for s in again] == [
        (s.name, s.memory_gib, s.anti_affinity) for s in servers
    ]


def test_bad_rows_are_reported_with_line_numbers_never_dropped() -> None:
    text = "\n".join([
        "# comment line",
        HEADER,
        GOOD,
        "bad name,EMR,v,8,2.4,32,100,500,50,20,60,40,24h,200,3,100000,,,1",
        "lab,LAB,v,x,2.4,32,100,500,50,20,60,40,24h,200,3,100000,,,1",
        "ris,RIS,v,8,2.4,32,100,500,50,70,60,40,sometimes,200,3,100000,,,1",
        "",
        "emr1,EMR,v,8,2.4,32,100,500,50,20,60,40,24h,200,3,100000,,,1",
        "pacs,PACS,v,8,2.4,32,100,500,50,20,60,40,24h,200,3,100000,solo,,1",
        "short,row",
    ])  # fmt: skip
    with pytest.raises(InventoryError) as e:
        parse_inventory(text, "inv.csv")
    p = e.value.problems
    assert any(x.startswith("line 4: name 'bad name' may contain only") for x in p), p
    assert "line 5: cores must be a whole number, not 'x'" in p
    assert any(x.startswith("line 6: criticality must be one of") for x in p)
    assert "line 6: cpu_avg_pct (70) is above cpu_peak_pct (50)" not in p  # reported once the row is otherwise valid
    assert "line 8: name 'emr1' is already used on line 3" in p
    assert any(x.startswith("line 9: anti-affinity group 'solo' has only this server") for x in p)
    assert "line 10: 2 fields, the header has 19" in p
    assert "\n" not in e.value.message and "inv.csv: 6 problems" in e.value.message


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("", "no header"),
        ("name,department\n", "missing columns"),
        (HEADER + ",colour\n" + GOOD + ",red", "unknown column colour"),
        (HEADER + "\n", "no servers"),
        (HEADER + "\n" + GOOD.replace(",50,20,", ",50,60,"), "cpu_avg_pct (60) is above cpu_peak_pct (50)"),
        (HEADER + "\n" + GOOD.replace(",32,100,", ",0,100,"), "memory_gib must be > 0 and at most 16384, not 0"),
        (HEADER + "\n" + GOOD.replace(",2.4,", ",nan,"), "clock_ghz must be a finite number"),
    ],
)
def test_bad_files(text: str, words: str) -> None:
    with pytest.raises(InventoryError) as e:
        parse_inventory(text)
    assert any(words in p for p in e.value.problems), e.value.problems


def test_price_sheet_changes_only_what_it_gives() -> None:
    base = default_prices()
    sheet = parse_prices("[power]\nyen_per_kwh = 40\n[cycle]\nyears = 5\n", "p.toml", base)
    assert sheet.power.yen_per_kwh == 40 and sheet.power.pue == base.power.pue and sheet.cycle.years == 5
    assert sheet.host_models == base.host_models
    one = parse_prices('[[host_models]]\nname="x"\ncores=8\nclock_ghz=3\nmemory_gib=64\niops=1000\nrack_u=1\n'
                       "price_yen=1000000\nidle_w=50\nmax_w=200\n", "p.toml", base)  # fmt: skip
    assert [m.name for m in one.host_models] == ["x"]
    for bad, words in [
        ("[power]\nyen_per_kwh = 'a lot'\n", "power.yen_per_kwh must be a number"),
        ("[power]\nvolts = 100\n", "unknown key power.volts"),
        ("[cycle]\nyears = 0\n", "cycle.years must be between 1 and 20"),
        ("[weather]\nsun = 1\n", "unknown section [weather]"),
        ("[[host_models]]\nname='x'\n", "host_models lacks"),
        ("not toml ===", "not valid TOML"),
    ]:
        with pytest.raises(InvalidSpec, match=re.escape(words)):
            parse_prices(bad, "p.toml", base)


def test_tco_before_and_after() -> None:
    servers = sample_inventory()
    plan = make_plan(servers, default_prices(), Options(time_limit=5, runs=50))
    c = plan["costs"]
    assert len(c["before_per_year"]) == len(c["after_per_year"]) == 6
    assert sum(c["before_per_year"]) == pytest.approx(c["before_total_yen"], abs=10)
    assert sum(x["total"] for x in c["after"]) == pytest.approx(c["after_total_yen"], abs=10)
    assert c["after_per_year"][0] > c["after_per_year"][1]  # the purchase is in year 1
    assert 0 < c["saving_pct"] < 100
    s = servers[0]
    assert replacement_year(s.__class__(**{**s.__dict__, "age_years": 8}), 6) == 1
    assert replacement_year(s.__class__(**{**s.__dict__, "age_years": 5}), 6) == 2
    assert replacement_year(s.__class__(**{**s.__dict__, "age_years": 0}), 6) is None


def test_monte_carlo_is_seeded_and_kasou_lowers_downtime() -> None:
    servers = sample_inventory()
    a = default_prices().availability
    host_of = [i % 6 for i in range(len(servers))]
    one = simulate(servers, host_of, 7, 1, 6, a, runs=300, seed=5)
    two = simulate(servers, host_of, 7, 1, 6, a, runs=300, seed=5)
    assert one["classes"] == two["classes"]
    for crit, e in one["classes"].items():
        assert e["after"]["mean_min_per_year"] < e["before"]["mean_min_per_year"], crit
        assert sum(e["after"]["histogram"]) == pytest.approx(1, abs=1e-3)
    assert one["planned_stops_avoided"] == 33 * 6 * a.hw_stops_per_year
    # No reserve: failures overlapping another host's repair wait for it.
    none = simulate(servers, host_of, 7, 0, 6, a.__class__(**{**a.__dict__, "host_mtbf_h": 500}), runs=200)
    assert (
        none["classes"]["24h-clinical"]["after"]["mean_min_per_year"]
        > one["classes"]["24h-clinical"]["after"]["mean_min_per_year"]
    )


class _Tags(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[str] = []

    def handle_starttag(self, tag: str, attrs: Any) -> None:
        self.tags.append(tag)


def test_the_report_renders(tmp_path: Path) -> None:
    plan = make_plan(sample_inventory(), default_prices(), Options(time_limit=5, runs=100))
    pdf = write_report(plan, tmp_path / "r" / "plan.html")
    assert pdf == tmp_path / "r" / "plan.pdf"
    html = (tmp_path / "r" / "plan.html").read_text()
    parser = _Tags()
    parser.feed(html)
    parser.close()
    assert parser.tags.count("svg") == 2 + len(plan["availability"]["classes"])
    assert parser.tags.count("table") >= 4 and "rect" in parser.tags and "polyline" in parser.tags
    for words in ("Lower bound", "Cost over 6 years", "Availability", "Assumptions", "emr-db1"):
        assert words in html
    data = pdf.read_bytes()
    assert data.startswith(b"%PDF-") and data.rstrip().endswith(b"%%EOF")
    pages = PdfReader(pdf).pages
    assert len(pages) >= 4, len(pages)
    text = "\n".join(pg.extract_text() for pg in pages)
    for words in ("Lower bound", "Availability", "Assumptions", "emr-db1"):
        assert words in text, words
    with pytest.raises(InvalidSpec):
        write_report(plan, tmp_path / "plan.pdf")


# -- the CLI --------------------------------------------------------------------------------------


def run(*args: str) -> Any:
    return CliRunner().invoke(cli.app, list(args), catch_exceptions=True)


def test_cli_plan_file_and_json(tmp_path: Path) -> None:
    inv = tmp_path / "inv.csv"
    inv.write_text(sample_text())
    r = run("plan", str(inv), "--runs", "50", "--time-limit", "5")
    assert r.exit_code == 0, r.output
    assert "33 servers -> 7 hosts" in r.output and "lower bound 7 hosts" in r.output
    r = run("plan", str(inv), "--json", "--reserve", "N+2", "--runs", "50", "--report", str(tmp_path / "p.html"))
    assert r.exit_code == 0, r.output
    plan = json.loads(r.output)
    assert plan["reserve"] == "N+2" and plan["lower_bound_hosts"] == plan["host_count"]
    for h in plan["hosts"]:
        assert set(h) >= {"name", "memory_mib", "vms"}
        assert all(set(v) >= {"name", "memory_mib"} for v in h["vms"])
    assert {"costs", "availability", "lower_bound_hosts"} <= set(plan)
    assert (tmp_path / "p.html").exists() and (tmp_path / "p.pdf").exists()
    assert run("plan", "make", str(inv), "--json", "--runs", "10").exit_code == 0


def test_cli_sample_and_prices_round_trip(tmp_path: Path) -> None:
    r = run("plan", "sample")
    assert r.exit_code == 0 and len(parse_inventory(r.output)) == 33
    r = run("plan", "prices")
    assert r.exit_code == 0 and parse_prices(r.output) == default_prices()


def test_cli_errors(tmp_path: Path) -> None:
    inv = tmp_path / "inv.csv"
    inv.write_text(HEADER + "\n" + GOOD + "\n" + GOOD.replace("emr1", "x y") + "\n")
    r = run("plan", str(inv))
    assert r.exit_code == 2  # bad input
    assert "line 3: name 'x y' may contain only" in r.output  # stderr is mixed in by CliRunner
    assert error_of(r) == f"{inv}: 1 problem; nothing planned"
    r = run("plan", str(tmp_path / "missing.csv"))
    assert r.exit_code == 2 and "does not exist" in error_of(r)
    inv.write_text(HEADER + "\n" + GOOD + "\n")
    r = run("plan", str(inv), "--reserve", "N+5")
    assert r.exit_code == 2 and "N+1 or N+2" in error_of(r)
    r = run("plan", str(inv), "--model", "mainframe")
    assert r.exit_code == 2 and "no host model 'mainframe'" in error_of(r)


def test_without_the_planner_extra_each_plan_command_says_how_to_install_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A hypervisor installed without ``kasou[planner]`` (no numpy, no OR-Tools): one line with the way out."""
    import importlib.util

    from kasou.cli import plan as plan_cli

    real = importlib.util.find_spec
    monkeypatch.setattr(
        plan_cli.importlib.util, "find_spec", lambda name, *a: None if name in ("numpy", "ortools") else real(name, *a)
    )
    inv = tmp_path / "inv.csv"
    inv.write_text(sample_text())
    for args in (("plan", "make", str(inv)), ("plan", "sample"), ("plan", "prices")):
        r = run(*args)
        assert r.exit_code == 1, (args, r.output)
        assert "the planner is not installed on this machine (missing numpy, ortools)" in r.output, r.output
        assert "pip install 'kasou[planner]'" in r.output and "Traceback" not in r.output


def test_the_pdf_draws_japanese_names(tmp_path: Path) -> None:
    """Departments in Japanese, as a hospital writes them: the PDF holds them as text (not as '?')."""
    rows = sample_text().splitlines()
    header = next(i for i, ln in enumerate(rows) if ln.startswith("name,"))
    jp = {"emr-db1": "電子カルテ主系", "pacs1": "放射線画像", "lab": "検体検査"}
    out = []
    for ln in rows[header + 1 :]:
        name, dept, *rest = ln.split(",")
        out.append(",".join([name, jp.get(name, dept), *rest]))
    inv = tmp_path / "inv.csv"
    inv.write_text("\n".join([rows[header], *out]) + "\n", encoding="utf-8")
    servers = read_inventory(inv)
    assert {s.department for s in servers} >= set(jp.values())
    plan = make_plan(servers, default_prices(), Options(time_limit=2, runs=50))
    pdf = write_report(plan, tmp_path / "plan.html")
    text = "".join("".join(pg.extract_text().split()) for pg in PdfReader(pdf).pages)
    missing = [d for d in jp.values() if d not in text]
    assert not missing, (missing, text[:500])
    assert "?" * 3 not in text
