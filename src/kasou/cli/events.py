"""``kasou event list``: what an operator must hear of (degraded disks, pools low on space, failed backups)."""

from __future__ import annotations

import time

import typer

from kasou.cli.common import client
from kasou.cli.output import JSON, OUTPUT, Col, columns, render, view

event_app = typer.Typer(
    help="Events: hosts down, VMs left without a restart, degraded disks, pools low on space, failed backups.",
    no_args_is_help=True,
)


EVENT_COLS = [
    Col("time", text=lambda e: time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(e["time"]))),
    Col("severity"),
    Col("kind"),
    Col("subject"),
    Col("message", text=lambda e: e["message"]),
]


@event_app.command("list")
def event_list(
    subject: str = typer.Option(None, "--subject", help="Only events about this, e.g. vm/emr or pool/fast."),
    severity: str = typer.Option(None, "--severity", help="At least this severity: info, warning, error or critical."),
    active: bool = typer.Option(False, "--active", help="Only conditions raised and not over yet."),
    limit: int = typer.Option(200, "--limit", min=1, max=5000),
    output: str = OUTPUT,
    column: list[str] = columns(EVENT_COLS),
    as_json: bool = JSON,
) -> None:
    """Recent events, oldest first."""
    v = view(output, column, as_json, EVENT_COLS)
    if active:
        events = client().get("/v1/events/active")
    else:
        params: dict[str, str | int] = {"limit": limit}
        if subject:
            params["subject"] = subject
        if severity:
            params["severity"] = severity
        events = client().get("/v1/events", params=params)
    render(events, EVENT_COLS, v)
