"""``kasou event list``: what an operator must hear of (degraded disks, pools low on space, failed backups)."""

from __future__ import annotations

import time

import typer
from rich.table import Table

from kasou.cli.common import client, out, print_json

event_app = typer.Typer(
    help="Events: hosts down, VMs left without a restart, degraded disks, pools low on space, failed backups.",
    no_args_is_help=True,
)


@event_app.command("list")
def event_list(
    subject: str = typer.Option(None, "--subject", help="Only events about this, e.g. vm/emr or pool/fast."),
    severity: str = typer.Option(None, "--severity", help="At least this severity: info, warning, error or critical."),
    active: bool = typer.Option(False, "--active", help="Only conditions raised and not over yet."),
    limit: int = typer.Option(200, "--limit", min=1, max=5000),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Recent events, oldest first."""
    if active:
        events = client().get("/v1/events/active")
    else:
        params: dict[str, str | int] = {"limit": limit}
        if subject:
            params["subject"] = subject
        if severity:
            params["severity"] = severity
        events = client().get("/v1/events", params=params)
    if as_json:
        print_json(events)
        return
    t = Table("time", "severity", "kind", "subject", "message")
    for e in events:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(e["time"]))
        t.add_row(when, e["severity"], e["kind"], e["subject"], e["message"])
    out.print(t)
