"""``kasou maintenance-window``: vendors' maintenance windows (request, approve, deny, revoke, list, show,
report). A vendor acts on a VM only inside an approved window that names it (docs/security.md)."""

from __future__ import annotations

import datetime as dt
from typing import Any

import typer

from kasou.cli.common import client, say
from kasou.cli.output import JSON, OUTPUT, Col, View, cols, columns, render, render_one, view
from kasou.errors import InvalidSpec
from kasou.model.maintenance import check_id

window_app = typer.Typer(help="Vendors' maintenance windows: when a vendor may act, on which VMs, with which "
                         "permissions, against which work plan.", no_args_is_help=True)  # fmt: skip


def parse_when(text: str, what: str) -> float:
    """``2026-12-08 09:00`` (this machine's local time), or ISO 8601 with a zone, as a UNIX time."""
    try:
        when = dt.datetime.fromisoformat(text.strip())
    except ValueError:
        raise InvalidSpec(f"{what} is a date and time like '2026-12-08 09:00', not {text[:60]!r}", field=what) from None
    return when.timestamp()  # a naive time is local time


def when_text(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M")


def _csv(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def _line(w: dict[str, Any]) -> str:
    state = "active" if w.get("active") else w["state"]
    return (f"maintenance window {w['id']}: {state} (vendor {w['vendor']}; VMs {', '.join(w['vms'])}; "
            f"{when_text(w['starts_at'])} to {when_text(w['ends_at'])}; {', '.join(w['permissions'])})")  # fmt: skip


WINDOW_COLS = [
    Col("id"), Col("vendor"), Col("state", text=lambda w: "active" if w["active"] else w["state"]),
    Col("starts_at", "from", lambda w: when_text(w["starts_at"])),
    Col("ends_at", "to", lambda w: when_text(w["ends_at"])),
    Col("vms", "VMs"), Col("permissions", "grants"), Col("requested_by", "requested by"),
    Col("decided_by", "approved by"),
    *cols(hidden=("departments", "plan", "active", "requested_at", "decided_at", "revoked_by", "revoked_at")),
]  # fmt: skip
REPORT_COLS = cols("id", "state", "window", "plan", "actions", "summary", "refused")


def _answer(w: dict[str, Any], v: View) -> None:
    render_one(w, WINDOW_COLS, v, human=lambda: say(_line(w)))


@window_app.command("request")
def window_request(
    vendor: str = typer.Option(..., "--vendor", help="The vendor user the window is for."),
    vms: str = typer.Option(..., "--vms", help="The VMs it names, comma-separated (of the vendor's departments)."),
    start: str = typer.Option(..., "--from", help="Its start, e.g. '2026-12-08 09:00' (local time)."),
    end: str = typer.Option(..., "--to", help="Its end (at most 7 days after its start)."),
    plan: str = typer.Option(..., "--plan", help="The stated work plan: what will be done."),
    permissions: str = typer.Option(
        "", "--permissions", help="What it grants, comma-separated: vm.read, operate, console (default: all)."
    ),
    output: str = OUTPUT,
    column: list[str] = columns(WINDOW_COLS),
    as_json: bool = JSON,
) -> None:
    """Request a window (by the vendor for themselves, an administrator or operator, or the department's manager)."""
    v = view(output, column, as_json, WINDOW_COLS)
    body: dict[str, Any] = {"vendor": vendor, "vms": _csv(vms), "starts_at": parse_when(start, "--from"),
                            "ends_at": parse_when(end, "--to"), "plan": plan}  # fmt: skip
    if permissions:
        body["permissions"] = _csv(permissions)
    _answer(client().post("/v1/maintenance-windows", json=body), v)


@window_app.command("approve")
def window_approve(
    window_id: str, output: str = OUTPUT, column: list[str] = columns(WINDOW_COLS), as_json: bool = JSON
) -> None:
    """Approve a requested window (an administrator or the department's manager who did not request it)."""
    v = view(output, column, as_json, WINDOW_COLS)
    _answer(client().post(f"/v1/maintenance-windows/{check_id(window_id)}/approve"), v)


@window_app.command("deny")
def window_deny(
    window_id: str, output: str = OUTPUT, column: list[str] = columns(WINDOW_COLS), as_json: bool = JSON
) -> None:
    """Deny a requested window (an administrator or the department's manager)."""
    v = view(output, column, as_json, WINDOW_COLS)
    _answer(client().post(f"/v1/maintenance-windows/{check_id(window_id)}/deny"), v)


@window_app.command("revoke")
def window_revoke(
    window_id: str, output: str = OUTPUT, column: list[str] = columns(WINDOW_COLS), as_json: bool = JSON
) -> None:
    """End a requested or approved window now: the vendor's access and consoles end with it."""
    v = view(output, column, as_json, WINDOW_COLS)
    _answer(client().post(f"/v1/maintenance-windows/{check_id(window_id)}/revoke"), v)


@window_app.command("list")
def window_list(output: str = OUTPUT, column: list[str] = columns(WINDOW_COLS), as_json: bool = JSON) -> None:
    """Every window (a vendor: their own; a manager: those of their departments), by start."""
    v = view(output, column, as_json, WINDOW_COLS)
    render(client().get("/v1/maintenance-windows"), WINDOW_COLS, v)


@window_app.command("show")
def window_show(
    window_id: str, output: str = OUTPUT, column: list[str] = columns(WINDOW_COLS), as_json: bool = JSON
) -> None:
    """One window: its state, who requested and decided it, and its plan."""
    v = view(output, column, as_json, WINDOW_COLS)
    w = client().get(f"/v1/maintenance-windows/{check_id(window_id)}")
    render_one(w, WINDOW_COLS, v, human=lambda: _show(w))


def _show(w: dict[str, Any]) -> None:
    say(_line(w))
    say(f"requested by {w['requested_by']} at {when_text(w['requested_at'])}")
    if w.get("decided_by"):
        say(f"{'approved' if w['state'] in ('approved', 'expired') else 'decided'} by {w['decided_by']} "
            f"at {when_text(w['decided_at'])}")  # fmt: skip
    if w.get("revoked_by"):
        say(f"revoked by {w['revoked_by']} at {when_text(w['revoked_at'])}")
    say("plan:")
    for line in w["plan"].splitlines():
        say(f"  {line}")


@window_app.command("report")
def window_report(
    window_id: str, output: str = OUTPUT, column: list[str] = columns(REPORT_COLS), as_json: bool = JSON
) -> None:
    """What was done inside the window (its audit records) against its stated plan, for the department's sign-off."""
    v = view(output, column, as_json, REPORT_COLS)
    r = client().get(f"/v1/maintenance-windows/{check_id(window_id)}/report")
    r = {"id": r["window"]["id"], "state": r["window"]["state"], **r}
    render_one(r, REPORT_COLS, v, human=lambda: _report(r))


def _report(r: dict[str, Any]) -> None:
    say(_line(r["window"]))
    say("stated plan:")
    for line in r["plan"].splitlines():
        say(f"  {line}")
    say(f"done ({len(r['actions'])} recorded actions, {r['refused']} refused):")
    for a in r["actions"]:
        res = a.get("result") or {}
        mark = "ok" if res.get("ok") else f"REFUSED {res.get('status') or ''}".strip()
        say(f"  {a['time']}  {a['action']}  {a['target']}  {mark}")
    if not r["actions"]:
        say("  (nothing)")
    say("signed off by the department: ____________________  date: __________")
