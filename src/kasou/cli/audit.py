"""``kasou audit``: the tamper-evident audit log (auditors and administrators)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer
from rich.table import Table

from kasou.cli.common import client, err, fail, out, print_json, say

audit_app = typer.Typer(help="The audit log: verify its chain, list and export records.", no_args_is_help=True)


@audit_app.command("verify")
def audit_verify(as_json: bool = typer.Option(False, "--json")) -> None:
    """Walk the hash chain and the signed checkpoints, and hold the store against the checkpoints anchored
    outside it (the anchor file); exit 0 only when the log is intact."""
    rep = client().get("/v1/audit/verify")
    if as_json:
        print_json(rep)
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
        if not as_json:
            err.print(f"TAMPERED: {p['kind']} at seq {p['seq']}: {p['message']}", markup=False, highlight=False)
        raise typer.Exit(1)


@audit_app.command("list")
def audit_list(
    since: str | None = typer.Option(None, "--since", help="ISO 8601 time (UTC unless it has a zone)."),
    actor: str | None = typer.Option(None, "--actor", help="User name."),
    target: str | None = typer.Option(None, "--target", help="vms/NAME, users/NAME, hosts/NAME (or a prefix)."),
    action: str | None = typer.Option(None, "--action", help="A part of the action (login, DELETE, ha_)."),
    limit: int = typer.Option(1000, "--limit", min=1),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Records, oldest first."""
    params = {k: v for k, v in {"since": since, "actor": actor, "target": target, "action": action}.items() if v}
    recs = client().get("/v1/audit/records", params={**params, "limit": limit})
    if as_json:
        print_json(recs)
        return
    t = Table("seq", "time (UTC)", "actor", "from", "action", "target", "result")
    for r in recs:
        a, res = r.get("actor") or {}, r.get("result") or {}
        who = f"{a.get('name')} ({a.get('role')})" if a else "-"
        outcome = "ok" if res.get("ok") else f"{res.get('status') or ''} {res.get('code') or ''} {res.get('message')}"
        t.add_row(str(r.get("seq")), str(r.get("time", ""))[:19], who, r.get("source") or "-", r.get("action"),
                  r.get("target") or "-", outcome.strip())  # fmt: skip
    out.print(t)


@audit_app.command("export")
def audit_export(
    fmt: str = typer.Option("json", "--format", help="csv or json (json holds the checkpoints too)."),
    output: Path | None = typer.Option(None, "--output", "-o", help="File to write (default: standard output)."),
) -> None:
    """The whole log for review or archiving."""
    if fmt not in ("csv", "json"):
        fail(f"--format is csv or json, not {fmt!r}")
    text = client().text("/v1/audit/export", params={"format": fmt})
    if output is None:
        sys.stdout.write(text)
        return
    output.write_text(text)
    n = len(json.loads(text)["records"]) if fmt == "json" else max(0, text.count("\n") - 1)
    say(f"{n} records written to {output}")


@audit_app.command("public-key")
def audit_public_key() -> None:
    """The site's checkpoint signing public key (PEM)."""
    sys.stdout.write(client().text("/v1/audit/public-key"))


@audit_app.command("checkpoint")
def audit_checkpoint() -> None:
    """Seal the log as it is now with a signed checkpoint."""
    cp = client().post("/v1/audit/checkpoint")
    say("the audit log is empty" if cp is None else f"checkpoint at {cp['seq']} signed by key {cp['key_id']}")
