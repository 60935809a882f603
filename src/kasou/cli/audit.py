"""``kasou audit``: the tamper-evident audit log (auditors and administrators)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer
import yaml
from rich.table import Table

from kasou.cli.common import client, err, fail, out, say
from kasou.cli.output import FORMATS, JSON, OUTPUT, Col, cols, columns, render, render_one, view

audit_app = typer.Typer(help="The audit log: verify its chain, list and export records.", no_args_is_help=True)


VERIFY_COLS = cols("ok", "records", "first_seq", "last_seq", "head_hash", "checkpoints", "last_checkpoint", "unsealed",
                   "problem", "anchor_file", "anchors", "last_anchor")  # fmt: skip


@audit_app.command("verify")
def audit_verify(output: str = OUTPUT, column: list[str] = columns(VERIFY_COLS), as_json: bool = JSON) -> None:
    """Walk the hash chain and the signed checkpoints, and hold the store against the checkpoints anchored
    outside it (the anchor file); exit 0 only when the log is intact."""
    v = view(output, column, as_json, VERIFY_COLS)
    rep = client().get("/v1/audit/verify")
    if not v.human:
        render_one(rep, VERIFY_COLS, v)
    elif rep["ok"]:
        say(f"intact: {rep['records']} records ({rep['first_seq'] or '-'}..{rep['last_seq'] or '-'}), "
            f"{rep['checkpoints']} signed checkpoints, the last at {rep['last_checkpoint'] or '-'}; "
            f"{rep['anchors']} anchored in {rep['anchor_file']}, the last at {rep['last_anchor'] or '-'}; "
            f"{rep['unsealed']} records after the last")  # fmt: skip
        if rep["checkpoints"] and not rep["anchors"]:
            warning = (f"warning: no checkpoint is anchored in {rep['anchor_file']} (a new anchor file, or it was "
                       "removed): the store was held against nothing outside it")  # fmt: skip
            err.print(warning, markup=False, highlight=False)
    if not rep["ok"]:
        p = rep["problem"]
        if v.human:
            err.print(f"TAMPERED: {p['kind']} at seq {p['seq']}: {p['message']}", markup=False, highlight=False)
        raise typer.Exit(1)


def _who(r: dict) -> str:
    a = r.get("actor") or {}
    return f"{a.get('name')} ({a.get('role')})" if a else "-"


def _outcome(r: dict) -> str:
    res = r.get("result") or {}
    return "ok" if res.get("ok") else f"{res.get('status') or ''} {res.get('code') or ''} {res.get('message')}".strip()


RECORD_COLS = [
    Col("seq"), Col("time", "time (UTC)", lambda r: str(r.get("time", ""))[:19]), Col("actor", text=_who),
    Col("source", "from"), Col("action"), Col("target"), Col("result", text=_outcome),
    Col("hash", hidden=True), Col("prev", hidden=True),
]  # fmt: skip


@audit_app.command("list")
def audit_list(
    since: str | None = typer.Option(None, "--since", help="ISO 8601 time (UTC unless it has a zone)."),
    actor: str | None = typer.Option(None, "--actor", help="User name."),
    target: str | None = typer.Option(None, "--target", help="vms/NAME, users/NAME, hosts/NAME (or a prefix)."),
    action: str | None = typer.Option(None, "--action", help="A part of the action (login, DELETE, ha_)."),
    limit: int = typer.Option(1000, "--limit", min=1),
    output: str = OUTPUT,
    column: list[str] = columns(RECORD_COLS),
    as_json: bool = JSON,
) -> None:
    """Records, oldest first."""
    view_ = view(output, column, as_json, RECORD_COLS)
    params = {k: v for k, v in {"since": since, "actor": actor, "target": target, "action": action}.items() if v}
    render(client().get("/v1/audit/records", params={**params, "limit": limit}), RECORD_COLS, view_)


@audit_app.command("export")
def audit_export(
    fmt: str = typer.Option("json", "--format", help="csv or json (json holds the checkpoints too)."),
    to: Path | None = typer.Option(None, "--to", "--file", help="File to write (default: standard output)."),
    output: str | None = typer.Option(
        None, "-o", "--output", metavar="FORMAT|FILE",
        help="json or yaml: the export printed in that format (table and value: as --format says). Any other "
        "value is the file to write, as before (--to FILE says it better).",
    ),
) -> None:  # fmt: skip
    """The whole log for review or archiving (as it is: no -c; kasou audit list -c ... picks columns)."""
    if output is not None and output.lower() not in FORMATS:  # the old --output FILE
        if to is not None:
            fail("give the file once: --to FILE (or the old --output FILE)", 2)
        to, output = Path(output), None
    if output is not None and output.lower() in ("json", "yaml"):
        fmt = "json"
    if fmt not in ("csv", "json"):
        fail(f"--format is csv or json, not {fmt!r}", 2)
    text = client().text("/v1/audit/export", params={"format": fmt})
    n = len(json.loads(text)["records"]) if fmt == "json" else max(0, text.count("\n") - 1)
    if output is not None and output.lower() == "yaml":
        text = yaml.safe_dump(json.loads(text), sort_keys=False, allow_unicode=True, default_flow_style=False)
    if to is None:
        sys.stdout.write(text)
        return
    to.write_text(text)
    say(f"{n} records written to {to}")


@audit_app.command("public-key")
def audit_public_key() -> None:
    """The site's checkpoint signing public key (PEM)."""
    sys.stdout.write(client().text("/v1/audit/public-key"))


@audit_app.command("checkpoint")
def audit_checkpoint() -> None:
    """Seal the log as it is now with a signed checkpoint."""
    cp = client().post("/v1/audit/checkpoint")
    say("the audit log is empty" if cp is None else f"checkpoint at {cp['seq']} signed by key {cp['key_id']}")


REVIEW_COLS = cols("since", "until", "since_local", "until_local", "tz", "department", "generated_at", "verify",
                   "records", "signins", "failed_signins", "failed_total", "lockouts", "break_glass", "windows",
                   "consoles", "permission_changes", "unusual", "truncated")  # fmt: skip


@audit_app.command("review")
def audit_review(
    since: str = typer.Option("30d", "--since", help="30d, 12h, 2w, or an ISO date or time (local time)."),
    until: str | None = typer.Option(None, "--until", help="The period's end (default: now)."),
    department: list[str] = typer.Option([], "--department", help="Only what concerns this department (repeat)."),
    report: Path | None = typer.Option(None, "--report", help="Write the HTML report (A4, signature block) here."),
    lang: str = typer.Option("ja", "--lang", help="ja or en (the report's language)."),
    tz: str = typer.Option("Asia/Tokyo", "--tz", help="The hospital's time zone (unusual hours, times shown)."),
    hours: str = typer.Option("07:00-20:00", "--hours", help="Working hours; sign-ins and actions outside are listed."),
    weekends: bool = typer.Option(True, "--weekends/--no-weekends", help="Weekends count as unusual hours."),
    output: str = OUTPUT,
    column: list[str] = columns(REVIEW_COLS),
    as_json: bool = JSON,
) -> None:
    """The access-log review of a period, the report the information-security officer signs each month: the audit
    chain's verification first, sign-ins, failures and lock-outs, break-glass uses, vendors' maintenance windows,
    console sessions, permission changes, unusual hours. Exit 1 if the chain is not intact."""
    v = view(output, column, as_json, REVIEW_COLS)
    if lang not in ("ja", "en"):
        fail(f"--lang is ja or en, not {lang!r}", 2)
    params: dict[str, object] = {"since": since, "tz": tz, "hours": hours, "weekends": str(weekends).lower()}
    if until:
        params["until"] = until
    if department:
        params["department"] = department
    rev = client().get("/v1/audit/review", params=params)
    if report is not None:
        html = client().text("/v1/audit/review", params={**params, "format": "html", "lang": lang})
        report.write_text(html, encoding="utf-8")
    render_one(rev, REVIEW_COLS, v, human=lambda: _review_text(rev, report))
    if not rev["verify"]["ok"]:
        raise typer.Exit(1)


def _review_text(rev: dict, report: Path | None) -> None:
    v, u = rev["verify"], rev["unusual"]
    scope = ", ".join(rev["department"]) if rev["department"] else "the whole site"
    say(f"access-log review of {scope}: {rev['since_local']} to {rev['until_local']} ({rev['tz']}), "
        f"{rev['records']} records")  # fmt: skip
    if v["ok"]:
        say(f"audit chain: intact ({v['records']} records, {v['checkpoints']} signed checkpoints, "
            f"{v['anchors']} anchored)")  # fmt: skip
    else:
        p = v["problem"] or {}
        err.print(f"audit chain: TAMPERED: {p.get('kind')} at seq {p.get('seq')}: {p.get('message')}", markup=False,
                  highlight=False)  # fmt: skip
    unacked = sum(1 for b in rev["break_glass"] if not b["acknowledged"])
    rows = [
        ("sign-ins", sum(s["count"] for s in rev["signins"])),
        ("users and sources signing in", len(rev["signins"])),
        ("failed sign-ins", rev["failed_total"]),
        ("lock-outs", len(rev["lockouts"])),
        ("break-glass uses (not acknowledged)", f"{len(rev['break_glass'])} ({unacked})"),
        ("vendor maintenance windows", len(rev["windows"])),
        ("console sessions", len(rev["consoles"])),
        ("permission changes", len(rev["permission_changes"])),
        (f"unusual hours (outside {u['hours']}{', weekends' if u['weekends'] else ''}): sign-ins / actions",
         f"{u['signins']} / {u['actions']}"),
    ]  # fmt: skip
    t = Table("", "count")
    for k, n in rows:
        t.add_row(k, str(n))
    out.print(t)
    if report is not None:
        say(f"report written to {report}")
