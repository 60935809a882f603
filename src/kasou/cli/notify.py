"""``kasou notify``: how kasou tells people of events (docs/notifications.md). ``test`` sends a test event
through every configured channel and prints, per channel, delivered, failed or skipped with the reason;
``status`` shows the channels and how their deliveries went."""

from __future__ import annotations

import time

import typer

from kasou.cli.common import client, say
from kasou.cli.output import JSON, OUTPUT, Col, cols, columns, render, view
from kasou.model.names import validate_name

notify_app = typer.Typer(help="Notifications: mail, webhooks and syslog for operator events.", no_args_is_help=True)

SEVERITIES = ("info", "warning", "error", "critical")
RESULT_COLS = cols("channel", "target", "outcome", "reason")
CHANNEL_COLS = [
    Col("name", "channel"), Col("target"), Col("department", text=lambda c: c["department"] or "(all)"),
    Col("min_severity", "min severity"), Col("delivered"), Col("failures"), Col("dropped"),
    Col("last_time", "last", lambda c: _last(c)), *cols(hidden=("last_ok", "last_error")),
]  # fmt: skip


def _last(c: dict) -> str:
    if c["last_time"] is None:
        return "-"
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(c["last_time"]))
    return f"{when} ok" if c["last_ok"] else f"{when} failed: {c['last_error']}"


@notify_app.command("test")
def notify_test(
    severity: str = typer.Option(None, "--severity", help="Test the channels' minimum severities with an event "
                                 "of this one (info, warning, error, critical); default: try every channel."),
    department: str = typer.Option(None, "--department", help="Route the test event as this department's "
                                   "(its route's contacts get it, other departments' do not)."),
    output: str = OUTPUT, column: list[str] = columns(RESULT_COLS), as_json: bool = JSON,
) -> None:  # fmt: skip
    """Send a test event through every configured channel; exit 1 if one failed."""
    v = view(output, column, as_json, RESULT_COLS)
    if severity is not None and severity not in SEVERITIES:
        raise typer.BadParameter(f"{severity!r} is not one of {', '.join(SEVERITIES)}", param_hint="--severity")
    if department is not None:
        validate_name(department, "department")
    body: dict[str, str] = {}
    if severity:
        body["severity"] = severity
    if department:
        body["department"] = department
    results = client(timeout=60.0).post("/v1/notify/test", json=body)["results"]

    def human() -> None:
        for r in results:
            why = f": {r['reason']}" if r["reason"] else ""
            say(f"{r['channel']} ({r['target']}): {r['outcome']}{why}")

    render(results, RESULT_COLS, v, human=human)
    if any(r["outcome"] == "failed" for r in results):
        raise typer.Exit(1)


@notify_app.command("status")
def notify_status(output: str = OUTPUT, column: list[str] = columns(CHANNEL_COLS), as_json: bool = JSON) -> None:
    """The channels configured on the API server, their last delivery and their failures."""
    v = view(output, column, as_json, CHANNEL_COLS)
    st = client().get("/v1/notify/status")
    render(st["channels"], CHANNEL_COLS, v, data=st)
    if not v.human:
        return
    if not st["channels"]:
        say("no notification channel is configured (docs/notifications.md)")
    if st["dropped"]:
        say(f"{st['dropped']} events were dropped: the queue was full")
