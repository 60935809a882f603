"""``kasou vm media insert|eject NAME [ISO]``: the VM's CD drive (an ISO image of its host; docs/media.md)."""

from __future__ import annotations

from typing import Any

import typer

from kasou.cli.common import client, say
from kasou.cli.output import JOB_COLS, JOB_COLUMN, JSON, OUTPUT, WAIT, act, view
from kasou.model.names import validate_name

media_app = typer.Typer(
    help="The VM's CD drive: put an ISO image in it (running or stopped) or empty it.", no_args_is_help=True
)


@media_app.command("insert")
def media_insert(
    name: str,
    iso: str = typer.Argument(..., help="An ISO image of the VM's host (kasou image import NAME FILE.iso)."),
    wait: bool = WAIT,
    output: str = OUTPUT,
    column: list[str] = JOB_COLUMN,
    as_json: bool = JSON,
) -> None:
    """Put an ISO image in the VM's CD drive (a stopped VM without a drive gets one)."""
    v = view(output, column, as_json, JOB_COLS)
    validate_name(name)  # here, not in the URL: 'a/b' would be a path of its own
    validate_name(iso, "iso")
    c = client()
    job = act(c, c.post(f"/v1/vms/{name}/media", json={"iso": iso})["job"], f"inserting {iso} in {name}", v, wait)
    if job is not None and v.human:
        when = "now" if (job.get("result") or {}).get("now") else "from its next start"
        say(f"vm {name}: ISO {iso} in its CD drive ({when})")


@media_app.command("eject")
def media_eject(
    name: str, wait: bool = WAIT, output: str = OUTPUT, column: list[str] = JOB_COLUMN, as_json: bool = JSON
) -> None:
    """Empty the VM's CD drive."""
    v = view(output, column, as_json, JOB_COLS)
    validate_name(name)
    c = client()
    if act(c, c.delete(f"/v1/vms/{name}/media")["job"], f"ejecting the CD of {name}", v, wait) and v.human:
        say(f"vm {name}: CD drive empty")


def cd_text(v: dict[str, Any]) -> str:
    """``vm show``'s line for the CD drive and the boot order."""
    if not v.get("cdrom_drive"):
        return "-"
    boot = ",".join(v.get("boot") or ["disk", "cdrom"])
    return f"{v.get('cdrom') or 'empty'} (boot {boot})"
