"""``kasou backup policy``: when VMs are backed up and how many generations are kept, per VM or per
department, in the hospital's own words (kasou.control.backup_policy)."""

from __future__ import annotations

import time
from typing import Any

import typer

from kasou.cli.common import client, fail, parse_int, say
from kasou.cli.output import JSON, OUTPUT, Col, cols, columns, render, render_one, view
from kasou.model.names import validate_name

policy_app = typer.Typer(
    help="Backup schedules and retention per VM or department (defaults follow the VM's criticality).",
    no_args_is_help=True,
)

DEPT_OPT = typer.Option(None, "--department", help="A department's policy (its VMs follow it where theirs is silent).")
POLICY_COLS = cols("vm", "department", "criticality", "daily", "weekly", "keep", "keep_is_default", "keep_daily",
                   "keep_weekly", "keep_monthly", "lock_days", "next_run", "sources")  # fmt: skip


def _path(vm: str | None, department: str | None) -> str:
    if (vm is None) == (department is None):
        fail("give a VM or --department D (one of the two)")
    if vm is not None:
        return f"/v1/vms/{validate_name(vm)}/backup-policy"
    return f"/v1/departments/{validate_name(str(department), 'department')}/backup-policy"


def _count(value: str | None, name: str) -> int | None:
    return None if value is None else parse_int(value, name)


@policy_app.command("set")
def policy_set(
    vm: str = typer.Argument(None, help="The VM (or give --department)."),
    department: str = DEPT_OPT,
    daily: str = typer.Option(None, "--daily", help="Back up every day at HH:MM (the host's local time)."),
    weekly: str = typer.Option(None, "--weekly", help="The day whose backup is a full one, e.g. sunday ('' clears)."),
    keep: str = typer.Option(None, "--keep", help="Keep the newest N generations."),
    keep_daily: str = typer.Option(None, "--keep-daily", help="And the newest of each of the last N days (0 clears)."),
    keep_weekly: str = typer.Option(None, "--keep-weekly", help="And of each of the last N weeks (0 clears)."),
    keep_monthly: str = typer.Option(None, "--keep-monthly", help="And of each of the last N months (0 clears)."),
    lock_days: str = typer.Option(
        None, "--lock-days", help="Days the backup server must lock each copy (checked by backup status; 0 clears)."
    ),
    off: bool = typer.Option(False, "--off", help="No scheduled backups (a VM's: even if its department has some)."),
    reset: bool = typer.Option(False, "--reset", help="Forget the settings here first (then follow the defaults)."),
    output: str = OUTPUT,
    column: list[str] = columns(POLICY_COLS),
    as_json: bool = JSON,
) -> None:
    """Set when a VM or a department's VMs are backed up and what is kept; unset parts come from the department,
    then the defaults (5 generations for 24h-clinical VMs, 3 for the others)."""
    v = view(output, column, as_json, POLICY_COLS)
    body: dict[str, Any] = {"off": off, "reset": reset}
    for name, value in (("daily", daily), ("weekly", weekly)):
        if value is not None:
            body[name] = value
    for name, raw in (("keep", keep), ("keep_daily", keep_daily), ("keep_weekly", keep_weekly),
                      ("keep_monthly", keep_monthly), ("lock_days", lock_days)):  # fmt: skip
        n = _count(raw, name.replace("_", "-"))
        if n is not None:
            body[name] = n
    p = client().patch(_path(vm, department), json=body)
    render_one(p, POLICY_COLS, v, human=lambda: say(_line(p)))


@policy_app.command("show")
def policy_show(
    vm: str = typer.Argument(None, help="One VM (its effective policy); none: every department and VM."),
    department: str = DEPT_OPT,
    output: str = OUTPUT,
    column: list[str] = columns(POLICY_COLS),
    as_json: bool = JSON,
) -> None:
    """The effective policy and where each part comes from (the VM, its department, or the defaults)."""
    v = view(output, column, as_json, POLICY_COLS)
    if vm is None and department is None:
        data = client().get("/v1/backup-policies")
        rows = data["departments"] + data["vms"]
        table = [
            Col("vm", "vm / department", lambda p: p["vm"] or f"department {p['department']}"), Col("criticality"),
            Col("daily", "schedule", _schedule), Col("keep", "keeps", _keeps), Col("lock_days", "lock", _lock),
            Col("sources", "from", _sources),
        ]  # fmt: skip
        render(rows, POLICY_COLS if v.columns else table, v, data=data)
        return
    p = client().get(_path(vm, department))
    render_one(p, POLICY_COLS, v, human=lambda: say(_line(p)))


def _schedule(p: dict[str, Any]) -> str:
    if not p["daily"]:
        return "no schedule"
    full = f", full on {p['weekly']}" if p.get("weekly") else ""
    return f"daily at {p['daily']}{full}"


def _keeps(p: dict[str, Any]) -> str:
    parts = [f"newest {p['keep']}"] if p["keep"] else []
    parts += [f"{p[k]} {label}" for k, label in (("keep_daily", "daily"), ("keep_weekly", "weekly"),
                                                  ("keep_monthly", "monthly")) if p.get(k)]  # fmt: skip
    return ", ".join(parts) or "all"


def _lock(p: dict[str, Any]) -> str:
    return "-" if p.get("lock_days") is None else f"{p['lock_days']} days"


def _sources(p: dict[str, Any]) -> str:
    return "; ".join(f"{k}: {v}" for k, v in p["sources"].items() if v != "none")


def _line(p: dict[str, Any]) -> str:
    who = f"vm {p['vm']}" if p["vm"] else f"department {p['department']}"
    nxt = f" (next {time.strftime('%Y-%m-%d %H:%M', time.localtime(p['next_run']))})" if p.get("next_run") else ""
    lock = f"; copies locked {p['lock_days']} days on the backup server" if p.get("lock_days") is not None else ""
    default = " (the default)" if p.get("keep_is_default") else ""
    return f"{who}: backups {_schedule(p)}{nxt}; keeps {_keeps(p)}{default}{lock}"
