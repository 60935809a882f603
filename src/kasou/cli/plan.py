"""``kasou plan``: the consolidation and TCO planner (``kasou.planner``), and ``kasou plan apply``.

``kasou plan INVENTORY.csv`` plans (the group's default command); ``kasou plan apply PLAN.json``
defines the planned VMs in a running kasou through the API; ``kasou plan sample`` and
``kasou plan prices`` print the shipped sample inventory and the default price sheet to edit.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import typer
from rich.table import Table
from typer.core import TyperGroup

from kasou.cli.common import client, err, fail, follow, out, say
from kasou.cli.output import COLUMN, JSON, OUTPUT, cols, columns, render, render_one, view
from kasou.errors import AlreadyExists, InvalidSpec, KasouError


class _DefaultCommandGroup(TyperGroup):
    """``kasou plan FILE ...`` runs ``kasou plan make FILE ...``: the first word that is not a command
    (nor ``--help``) means the default command."""

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h"):
            args = ["make", *args]
        return super().parse_args(ctx, args)


plan_app = typer.Typer(
    cls=_DefaultCommandGroup,
    help="Plan consolidation: kasou plan INVENTORY.csv [--prices P] [--reserve N+1|N+2] [--report plan.html] "
    "[-o json]; kasou plan apply PLAN.json.",
    no_args_is_help=True,
)


#: The planner's own packages: an extra (``pip install 'kasou[planner]'``), so that a hypervisor's install stays lean.
PLANNER_PACKAGES = ("numpy", "ortools")


def need_planner() -> None:
    """Refuse in one line, with the way out, when the planner's extra is not installed on this machine."""
    missing = [m for m in PLANNER_PACKAGES if importlib.util.find_spec(m) is None]
    if missing:
        fail(f"the planner is not installed on this machine (missing {', '.join(missing)}): install it with "
             "pip install 'kasou[planner]' (from a checkout: .venv/bin/pip install -e '.[planner]'); "
             "kasou plan apply needs only a plan's JSON and works without it")  # fmt: skip


def _yen(v: float) -> str:
    return f"{v / 1e6:,.1f} M yen"


@plan_app.command("make")
def plan_make(
    inventory: Path = typer.Argument(..., help="CSV of the physical servers (docs/planner.md; kasou plan sample)."),
    prices: Path = typer.Option(
        None, "--prices", help="TOML price sheet with the keys it changes (kasou plan prices)."
    ),
    reserve: str = typer.Option("N+1", "--reserve", help="Failover reserve: N+1 or N+2 hosts' worth (N+0: none)."),
    report: Path = typer.Option(None, "--report", help="Write this HTML report and a PDF beside it (.pdf)."),
    output: str = typer.Option(
        "table",
        "-o",
        "--output",
        metavar="FORMAT",
        help="table, json (the input of kasou plan apply), yaml or value.",
    ),
    column: list[str] = COLUMN,
    as_json: bool = JSON,
    solver: str = typer.Option("auto", "--solver", help="auto (CP-SAT up to 300 VMs), exact or heuristic."),
    time_limit: float = typer.Option(10.0, "--time-limit", min=0.1, max=3600, help="CP-SAT seconds per host model."),
    model: str = typer.Option(None, "--model", help="Only this host model of the price sheet."),
    years: int = typer.Option(None, "--years", min=1, max=20, help="Replacement cycle in years (price sheet: 6)."),
    runs: int = typer.Option(None, "--runs", min=1, max=1_000_000, help="Monte Carlo runs (price sheet: 2000)."),
    seed: int = typer.Option(1, "--seed", help="Seed of the Monte Carlo simulation."),
) -> None:
    """Plan hosts for an inventory: model and count, every VM placed, cost over the cycle, availability (-c: a
    part of the plan: servers, host_count, hosts, costs, availability, ...)."""
    v = view(output, column, as_json)
    need_planner()
    from kasou.planner import Options, make_plan, parse_reserve, read_inventory, read_prices
    from kasou.planner.inventory import InventoryError
    from kasou.planner.prices import Cycle

    k = parse_reserve(reserve)
    sheet = read_prices(prices)
    if years is not None:
        sheet = sheet.replace(cycle=Cycle(years))
    try:
        servers = read_inventory(inventory)
    except InventoryError as e:
        for p in e.problems:
            err.print(f"{inventory}: {p}", markup=False, highlight=False, soft_wrap=True)
        raise
    opts = Options(reserve=k, solver=solver, time_limit=time_limit, model=model, seed=seed, runs=runs)
    plan = make_plan(servers, sheet, opts, source=inventory.name)
    if report is not None:
        from kasou.planner.report import write_report

        pdf = write_report(plan, report)
        plan["report"] = {"html": str(report), "pdf": str(pdf)}
    render_one(plan, cols(*plan), v, human=lambda: _show(plan))


def _show(plan: dict[str, Any]) -> None:
    m, s = plan["host_model"], plan["solver"]
    say(f"{plan['servers']} servers -> {plan['host_count']} hosts of {m['name']} ({m['cores']} cores, "
        f"{m['memory_gib']} GiB), reserve {plan['reserve']}")  # fmt: skip
    say(f"lower bound {plan['lower_bound_hosts']} hosts, gap {plan['gap_hosts']} ({plan['gap_pct']} %); "
        f"{s['name']}: {s['status']} in {s['seconds']} s; placement {s['placement']}")  # fmt: skip
    t = Table("host", "role", "VMs", "memory", "vCPUs", "CPU peak", "CPU avg")
    for h in plan["hosts"]:
        u = h["use"]
        t.add_row(h["name"], h["role"], str(len(h["vms"])), f"{u['memory']:.0%}", f"{u['vcpus']:.0%}",
                  f"{u['cpu']:.0%}", f"{u['cpu_avg']:.0%}")  # fmt: skip
    out.print(t)
    c = plan["costs"]
    say(f"cost over {c['years']} years: before {_yen(c['before_total_yen'])}, after {_yen(c['after_total_yen'])}, "
        f"saving {_yen(c['saving_yen'])} ({c['saving_pct']} %)")  # fmt: skip
    a = plan["availability"]
    t = Table("criticality", "systems", "before min/yr", "after min/yr", "after p99")
    for crit, e in a["classes"].items():
        t.add_row(crit, str(e["systems"]), f"{e['before']['mean_min_per_year']:.1f}",
                  f"{e['after']['mean_min_per_year']:.1f}", f"{e['after']['p99_min_per_year']:.1f}")  # fmt: skip
    out.print(t)
    say(f"planned stops avoided by live migration: {a['planned_stops_avoided']} over {a['years']} years "
        f"({a['runs']} runs, seed {a['seed']})")  # fmt: skip
    if "report" in plan:
        say(f"report: {plan['report']['html']}, {plan['report']['pdf']}")


@plan_app.command("sample")
def plan_sample() -> None:
    """Print the sample inventory (a 400-bed hospital's department servers) to start from."""
    need_planner()
    from kasou.planner.inventory import sample_text

    typer.echo(sample_text(), nl=False)


@plan_app.command("prices")
def plan_prices() -> None:
    """Print the default price sheet (TOML, every assumption commented) to copy and edit."""
    need_planner()
    from kasou.planner.prices import default_prices_text

    typer.echo(default_prices_text(), nl=False)


_PRIORITY = {"24h-clinical": 90, "business-hours": 50, "batch": 10}


def _bodies(plan: Any, image: str, disks: bool, network: str, storage: str, ha: bool) -> list[dict[str, Any]]:
    """The create requests of every VM of a plan, each checked as the API will check it."""
    from kasou.model.spec import VMCreate

    if not isinstance(plan, dict) or not isinstance(plan.get("hosts"), list):
        raise InvalidSpec("not a kasou plan: no list of hosts (make one with kasou plan INVENTORY.csv --json)")
    if plan.get("kasou_plan") != 1:
        raise InvalidSpec(f"unknown plan version {plan.get('kasou_plan')!r}; this kasou reads version 1")
    bodies: list[dict[str, Any]] = []
    seen: set[str] = set()
    for h in plan["hosts"]:
        for v in h.get("vms", []) if isinstance(h, dict) else []:
            if not isinstance(v, dict):
                raise InvalidSpec(f"host {h.get('name')}: a VM entry is not an object")
            name = v.get("name")
            if name in seen:
                raise InvalidSpec(f"the plan has VM {name!r} twice")
            seen.add(str(name))
            disk = v.get("disk_gib")
            body: dict[str, Any] = {
                "name": name, "image": image, "vcpus": v.get("vcpus", 1), "memory_mib": v.get("memory_mib"),
                "network": network, "storage": storage, "anti_affinity": v.get("anti_affinity"),
                "ha": ha, "priority": _PRIORITY.get(str(v.get("criticality")), 50),
                "criticality": v.get("criticality") or None,  # its backups' defaults follow it
                "description": f"{v.get('department', '')} (planned on {h.get('name')})"[:500],
            }  # fmt: skip
            if disks and isinstance(disk, int | float) and disk > 0:
                body["disk"] = f"{max(1, round(disk))}G"
            try:
                VMCreate.parse(body)
            except InvalidSpec as e:
                raise InvalidSpec(f"VM {name!r} in the plan: {e.message}") from None
            bodies.append(body)
    if not bodies:
        raise InvalidSpec("the plan has no VMs")
    return bodies


APPLY_COLS = cols("name", "host", "state")


@plan_app.command("apply")
def plan_apply(
    plan_file: Path = typer.Argument(..., help="A plan from kasou plan INVENTORY.csv --json > plan.json."),
    image: str = typer.Option("tiny", "--image", help="The image every VM is created from (a placeholder OS)."),
    disks: bool = typer.Option(True, "--disks/--no-disks", help="Give each VM a data disk of its planned size."),
    network: str = typer.Option("user", "--network", help="The network of every VM's NIC."),
    storage: str = typer.Option("local", "--storage", help="local, shared or replicated disks."),
    ha: bool = typer.Option(
        True,
        "--ha/--no-ha",
        help="High availability (restart priority from criticality); in a cluster it needs "
        "--storage replicated or shared.",
    ),
    output: str = OUTPUT,
    column: list[str] = columns(APPLY_COLS),
    as_json: bool = JSON,
) -> None:
    """Define the planned VMs (stopped) with their sizes and anti-affinity groups; all or nothing."""
    v = view(output, column, as_json, APPLY_COLS)
    try:
        plan = json.loads(plan_file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InvalidSpec(f"plan {plan_file} does not exist") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InvalidSpec(f"plan {plan_file} is not readable JSON: {e}") from None
    bodies = _bodies(plan, image, disks, network, storage, ha)
    c = client()
    if ha and storage == "local" and len(c.get("/v1/hosts")) > 1:
        raise InvalidSpec(
            "in a cluster HA restarts a VM on another host when its host fails, and a local disk is on its own "
            "host alone: give --storage replicated or --storage shared, or --no-ha; nothing created"
        )
    existing = {v["name"] for v in c.get("/v1/vms")}
    clash = [b["name"] for b in bodies if b["name"] in existing]
    if clash:
        raise AlreadyExists(f"{len(clash)} VM name(s) of the plan exist already: {', '.join(clash)}; nothing created")
    made: list[str] = []
    current = ""
    try:
        for b in bodies:
            current = b["name"]
            res = c.post("/v1/vms", json=b)
            made.append(current)
            follow(c, res["job"], f"creating {current}", console=out if v.table else err)
    except KasouError as e:
        undone = _undo(c, made)
        raise type(e)(
            f"creating {current} failed: {e.message}; removed the {undone} VM(s) this apply had made"
        ) from None
    vms = {v["name"]: v for v in c.get("/v1/vms") if v["name"] in set(made)}
    if not v.human:
        render([{"name": n, "host": vms.get(n, {}).get("host"), "state": vms.get(n, {}).get("state")} for n in made],
               APPLY_COLS, v)  # fmt: skip
        return
    for n in made:
        say(f"vm {n}: defined on {vms.get(n, {}).get('host')}")
    say(f"{len(made)} VMs defined (stopped); start them with kasou vm start NAME")


def _undo(c: Any, names: list[str]) -> int:
    removed = 0
    for name in reversed(names):
        try:
            res = c.delete(f"/v1/vms/{name}", params={"force": True})
            if isinstance(res, dict) and "job" in res:
                c.wait_job(res["job"]["id"], 120)
            removed += 1
        except KasouError:
            continue
    return removed
