"""The availability model's failover time comes from a recorded bench/failover.py result, or is
labelled an assumption; it is never a figure typed in and called measured."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kasou.planner import availability
from kasou.planner.prices import Availability, default_prices, parse_prices

REPO = Path(__file__).resolve().parents[2]


def _result(tmp_path: Path, to_restart: float, kills: int = 3) -> Path:
    p = tmp_path / "failover.json"
    p.write_text(json.dumps({"kills": kills, "recorded": "2026-12-06T12:00:00Z", "commit": "abc1234",
                             "accelerator": "tcg", "median_s": {"to_restart": to_restart, "total": to_restart + 5}}))  # fmt: skip
    return p


def test_the_recorded_median_is_used_and_said_to_be_measured(tmp_path: Path) -> None:
    f = availability.failover(Availability(), _result(tmp_path, 8.4))
    assert f.seconds == 8.4
    assert f.measured
    assert "measured" in f.source and "3 host kills" in f.source and "2026-12-06" in f.source
    text = " ".join(availability.assumptions(Availability(), _result(tmp_path, 8.4)))
    assert "8.4 s detection and fence wait (measured" in text


def test_without_a_recorded_result_it_is_an_assumption_and_says_so(tmp_path: Path) -> None:
    f = availability.failover(Availability(), tmp_path / "none.json")
    assert not f.measured
    assert "assumption" in f.source and "measured" not in f.source.replace("not measured", "")
    text = " ".join(availability.assumptions(Availability(), tmp_path / "none.json"))
    assert "(measured" not in text and "assumption" in text


@pytest.mark.parametrize("bad", ["{", "[]", '{"median_s": {"to_restart": -1}}', '{"median_s": {}}'])
def test_a_damaged_result_falls_back_to_the_assumption_and_names_the_file(tmp_path: Path, bad: str) -> None:
    p = tmp_path / "failover.json"
    p.write_text(bad)
    f = availability.failover(Availability(), p)
    assert not f.measured and str(p) in f.source


def test_a_price_sheet_value_wins_and_is_labelled_as_the_sheets(tmp_path: Path) -> None:
    sheet = parse_prices("[availability]\nfailover_s = 20\n", "p.toml", default_prices())
    f = availability.failover(sheet.availability, _result(tmp_path, 8.4))
    assert f.seconds == 20 and "price sheet" in f.source and not f.measured


def test_the_default_sheet_reads_the_checked_in_bench_result() -> None:
    recorded = json.loads((REPO / "bench" / "results" / "failover.json").read_text())
    f = availability.failover(default_prices().availability)
    assert f.measured and f.seconds == recorded["median_s"]["to_restart"]
    assert "bench/results/failover.json" in f.source


def test_the_simulation_restarts_after_the_resolved_failover(tmp_path: Path) -> None:
    a = Availability()
    s = availability.failover(a, _result(tmp_path, 8.4)).seconds
    assert availability.restart_seconds(a, _result(tmp_path, 8.4)) == s + a.guest_boot_s
