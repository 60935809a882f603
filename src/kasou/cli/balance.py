"""``kasou cluster balance`` and ``kasou cluster balance-settings``: the load balancer (docs/operations.md,
Balancing). The plan is printed move by move (VM, from, to, why, the spread before and after); without
``--dry-run`` the moves run as one job of live migrations and each VM's result is printed."""

from __future__ import annotations

from typing import Any

import typer
from rich.table import Table

from kasou.cli.common import client, err, follow, out, say
from kasou.cli.output import JSON, OUTPUT, WAIT, Col, cols, columns, dump, render, render_one, view
from kasou.errors import KasouError


def _spread(s: dict[str, float]) -> str:
    return ", ".join(f"{r} {v:g}" for r, v in sorted(s.items()))


def print_plan(p: dict[str, Any]) -> None:
    say(f"spread before (points): {_spread(p['spread_before'])}; after the plan: {_spread(p['spread_after'])}")
    if p["moves"]:
        t = Table("VM", "FROM", "TO", "SPREAD", "REASON", box=None, pad_edge=False)
        for m in p["moves"]:
            spread = f"{m['resource']} {m['spread_before']:g} → {m['spread_after']:g}"
            t.add_row(m["vm"], m["source"], m["target"], spread, m["reason"])
        out.print(t, soft_wrap=True)
    for host, why in sorted(p.get("excluded", {}).items()):
        say(f"host {host} takes no part: {why}")
    for vm, why in sorted(p.get("held", {}).items()):
        say(f"VM {vm} stays: {why}")
    say(p["summary"])


def _print_results(rows: list[dict[str, Any]]) -> None:
    for r in rows:
        if r.get("ok"):
            took = (
                f" (downtime {r['downtime_ms']} ms, total {r['total_ms']} ms)" if r.get("total_ms") is not None else ""
            )
            say(f"{r['vm']}: moved {r['from']} → {r['to']}{took}")
        else:
            err.print(f"{r['vm']}: not moved {r['from']} → {r['to']}: {r.get('error')}", markup=False, highlight=False,
                      soft_wrap=True)  # fmt: skip


def _move_spread(m: dict[str, Any]) -> str:
    return f"{m['resource']} {m['spread_before']:g} → {m['spread_after']:g}"


MOVE_COLS = [Col("vm", "VM"), Col("source", "FROM"), Col("target", "TO"), Col("spread", "SPREAD", text=_move_spread,
             value=_move_spread), Col("reason", "REASON"), Col("resource", hidden=True)]  # fmt: skip
SETTINGS_COLS = cols("mode", "threshold", "hysteresis", "max_parallel", "max_moves", "cooldown_s", "interval_s",
                     "local_disks")  # fmt: skip


def balance(
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the plan only; move nothing."),
    wait: bool = WAIT,
    output: str = OUTPUT,
    column: list[str] = columns(MOVE_COLS),
    as_json: bool = JSON,
) -> None:
    """Even out the hosts' CPU and memory pressure by live migration: the plan, then (without --dry-run) the moves,
    at most balance max_parallel at once. -o json: the plan (and the finished job); -c: the moves' columns."""
    v = view(output, column, as_json, MOVE_COLS)
    c = client()
    res = c.post("/v1/cluster/balance", json={"dry_run": dry_run})
    job = res.get("job")
    plan = res["plan"]
    if not v.human and (dry_run or not job or not wait or v.columns):
        render(plan["moves"], MOVE_COLS, v, data=res)
        if dry_run or not job or not wait:
            return
    if v.human:
        print_plan(plan)
    if not job:
        return
    if not wait:
        say(f"balancing: job {job['id']}")
        return
    try:
        done = follow(c, job, f"balancing: {len(plan['moves'])} moves", timeout=3600, console=out if v.table else err)
    except KasouError as e:
        _print_results(e.details.get("moves") or [])
        raise
    if v.format in ("json", "yaml") and not v.columns:
        dump({**res, "job": done}, v.format)
    elif v.human:
        _print_results((done.get("result") or {}).get("moves", []))


def balance_settings(
    mode: str = typer.Option(None, "--mode", help="off, recommend (an event names the moves) or automatic."),
    threshold: float = typer.Option(None, "--threshold", help="Points of pressure spread tolerated (1-100)."),
    hysteresis: float = typer.Option(None, "--hysteresis", help="Points by which a move must close its hosts' gap."),
    max_parallel: int = typer.Option(None, "--max-parallel", help="Live migrations at once."),
    max_moves: int = typer.Option(None, "--max-moves", help="Moves per round."),
    cooldown: int = typer.Option(None, "--cooldown", help="Seconds a VM the balancer moved stays where it is."),
    interval: int = typer.Option(None, "--interval", help="Seconds between rounds in recommend and automatic mode."),
    local_disks: bool = typer.Option(None, "--local-disks/--no-local-disks", help="Move VMs whose disks are local."),
    output: str = OUTPUT,
    column: list[str] = columns(SETTINGS_COLS),
    as_json: bool = JSON,
) -> None:
    """Show the balancer's settings, or change those given."""
    v = view(output, column, as_json, SETTINGS_COLS)
    c = client()
    s = dict(c.get("/v1/cluster/balance/settings"))
    changes = {"mode": mode, "threshold": threshold, "hysteresis": hysteresis, "max_parallel": max_parallel,
               "max_moves": max_moves, "cooldown_s": cooldown, "interval_s": interval,
               "local_disks": local_disks}  # fmt: skip
    changes = {k: v for k, v in changes.items() if v is not None}
    if changes:
        s = dict(c.put("/v1/cluster/balance/settings", json={**s, **changes}))
    render_one(s, SETTINGS_COLS, v, human=lambda: say(" ".join(f"{k}={val}" for k, val in s.items())))
