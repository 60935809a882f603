"""``kasou notify``: how kasou tells people of events (docs/notifications.md). ``test`` sends a test event
through every configured channel and prints, per channel, delivered, failed or skipped with the reason;
``status`` shows the channels and how their deliveries went."""

from __future__ import annotations

import time

import typer
from rich.table import Table

from kasou.cli.common import client, out, print_json, say
from kasou.model.names import validate_name

notify_app = typer.Typer(help="Notifications: mail, webhooks and syslog for operator events.", no_args_is_help=True)

SEVERITIES = ("info", "warning", "error", "critical")


@notify_app.command("test")
def notify_test(
    severity: str = typer.Option(None, "--severity", help="Test the channels' minimum severities with an event "
                                 "of this one (info, warning, error, critical); default: try every channel."),
    department: str = typer.Option(None, "--department", help="Route the test event as this department's "
                                   "(its route's contacts get it, other departments' do not)."),
    as_json: bool = typer.Option(False, "--json"),
) -> None:  # fmt: skip
    """Send a test event through every configured channel; exit 1 if one failed."""
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
    if as_json:
        print_json(results)
    else:
        for r in results:
            why = f": {r['reason']}" if r["reason"] else ""
            say(f"{r['channel']} ({r['target']}): {r['outcome']}{why}")
    if any(r["outcome"] == "failed" for r in results):
        raise typer.Exit(1)


@notify_app.command("status")
def notify_status(as_json: bool = typer.Option(False, "--json")) -> None:
    """The channels configured on the API server, their last delivery and their failures."""
    st = client().get("/v1/notify/status")
    if as_json:
        print_json(st)
        return
    t = Table("channel", "target", "department", "min severity", "delivered", "failures", "dropped", "last")
    for c in st["channels"]:
        last = "-"
        if c["last_time"] is not None:
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(c["last_time"]))
            last = f"{when} ok" if c["last_ok"] else f"{when} failed: {c['last_error']}"
        t.add_row(c["name"], c["target"], c["department"] or "(all)", c["min_severity"], str(c["delivered"]),
                  str(c["failures"]), str(c["dropped"]), last)  # fmt: skip
    out.print(t)
    if not st["channels"]:
        say("no notification channel is configured (docs/notifications.md)")
    if st["dropped"]:
        say(f"{st['dropped']} events were dropped: the queue was full")
