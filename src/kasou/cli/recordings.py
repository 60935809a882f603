"""``kasou console recordings``: the recorded console sessions (auditors and administrators), and their export
for an investigation (a decrypted, self-describing file; every export is a record in the audit chain)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import typer

from kasou.cli.common import client, fail, say
from kasou.cli.output import JSON, OUTPUT, Col, columns, render, view

console_app = typer.Typer(help="Web and serial console sessions.", no_args_is_help=True)
recordings_app = typer.Typer(help="Recorded console sessions: list (the default) and export.")
console_app.add_typer(recordings_app, name="recordings")

EXPORT_MAGIC = b"KASOU-RECORDING-EXPORT 1\n"


def _when(t: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) if t else "-"


def _minutes(r: dict) -> str:
    return f"{((r['ended'] or time.time()) - r['started']) / 60:.1f}"


REC_COLS = [
    Col("id"), Col("vm"), Col("user", text=lambda r: f"{r['user']} ({r['role']})"), Col("kind"), Col("window"),
    Col("started", text=lambda r: _when(r["started"])), Col("minutes", value=_minutes, text=_minutes),
    Col("size", text=lambda r: f"{r['size'] / 1024:.0f} KiB"),
    Col("state", text=lambda r: r["state"] + (" (held)" if r.get("hold") else "")), Col("host"),
    *[Col(k, hidden=True) for k in ("role", "via", "source", "console", "ended", "plain_bytes", "events", "sha256",
                                    "error", "hold")],
]  # fmt: skip


@recordings_app.callback(invoke_without_command=True)
def recordings(
    ctx: typer.Context,
    vm: str | None = typer.Option(None, "--vm", help="Of this VM."),
    user: str | None = typer.Option(None, "--user", help="Of this user."),
    window: str | None = typer.Option(None, "--window", help="Opened in this vendor maintenance window."),
    output: str = OUTPUT,
    column: list[str] = columns(REC_COLS),
    as_json: bool = JSON,
) -> None:
    """Recorded console sessions, oldest first."""
    if ctx.invoked_subcommand is not None:
        return
    view_ = view(output, column, as_json, REC_COLS)
    params = {k: v for k, v in {"vm": vm, "user": user, "window": window}.items() if v}
    render(client().get("/v1/recordings", params=params), REC_COLS, view_)


@recordings_app.command("export")
def export(
    rec_id: str = typer.Argument(..., metavar="ID"),
    dest: Path = typer.Option(..., "--out", help="The file to write (made with mode 0600; not overwritten)."),
) -> None:
    """Export a recording for an investigation: its metadata, the digest check, what was typed, and the events,
    decrypted. The export is recorded in the audit chain."""
    try:
        fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as e:
        fail(f"cannot make {dest}: {e.strerror or e}")
    try:
        with os.fdopen(fd, "wb") as f:
            n = client().download(f"/v1/recordings/{rec_id}/export", f)
    except BaseException:
        dest.unlink(missing_ok=True)
        raise
    with open(dest, "rb") as f:
        if f.read(len(EXPORT_MAGIC)) != EXPORT_MAGIC:
            dest.unlink(missing_ok=True)
            fail("the API's answer is not a recording export")
        head = json.loads(f.readline())
    r = head["recording"]
    ok = "digest verified" if head["digest_ok"] else "DIGEST MISMATCH"
    say(f"recording {r['id']} of {r['vm']} by {r['user']} ({_when(r['started'])} .. {_when(r['ended'])}): "
        f"{n} bytes written to {dest}; sha256 {head['sha256'][:16]}…, {ok}")  # fmt: skip
    if not head["digest_ok"]:
        raise typer.Exit(1)
