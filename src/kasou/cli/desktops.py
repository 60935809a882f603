"""``kasou pool-desktop``: desktop pools (N linked clones of a template handed to clinicians at sign-in).

Not to be mixed up with ``kasou pool`` (storage pools).
"""

from __future__ import annotations

import time
from typing import Any

import typer

from kasou.cli.common import client, err, follow, out, say
from kasou.cli.output import JOB_COLS, JOB_COLUMN, JSON, OUTPUT, WAIT, Col, View, act, columns, render, render_one, view
from kasou.model.desktops import validate_pool_name

desktop_pool_app = typer.Typer(
    help="Desktop pools: desktop VMs as linked clones of a template, one per signed-in clinician, reset at sign-out.",
    no_args_is_help=True,
)


def _finish(c: Any, res: dict[str, Any], title: str, v: View, wait: bool = True) -> dict[str, Any] | None:
    """The finished job when the command is to say it in words (else act printed it, or --no-wait)."""
    job = act(c, res["job"], title, v, wait)
    return job if job is not None and v.human else None


@desktop_pool_app.command("create")
def create(
    name: str,
    template: str = typer.Option(..., "--template", help="The template its desktops are linked clones of."),
    size: int = typer.Option(..., "--size", help="How many desktops (1..99), named NAME-01, NAME-02, ..."),
    prestart: int = typer.Option(0, "--prestart", help="Desktops kept booted and free, so a sign-in gets one at once."),
    persistent: bool = typer.Option(False, "--persistent", help="A desktop stays its user's and is never reset."),
    idle_minutes: int = typer.Option(None, "--idle-minutes", help="Return (and reset) a desktop after this idle time."),
    allow_clipboard: bool = typer.Option(False, "--allow-clipboard", help="The console may share the clipboard."),
    allow_file_transfer: bool = typer.Option(False, "--allow-file-transfer", help="The console may move files."),
    allow_usb: bool = typer.Option(False, "--allow-usb", help="The console may redirect USB devices."),
    record: bool = typer.Option(False, "--record", help="Record the desktops' console sessions (encrypted)."),
    description: str = typer.Option("", "--description", help="Shown to clinicians on the portal."),
    wait: bool = WAIT,
    output: str = OUTPUT,
    column: list[str] = JOB_COLUMN,
    as_json: bool = JSON,
) -> None:
    """Define a desktop pool and make its desktops."""
    v = view(output, column, as_json, JOB_COLS)
    body: dict[str, Any] = {
        "name": name, "template": template, "size": size, "prestart": prestart, "persistent": persistent,
        "idle_minutes": idle_minutes, "allow_clipboard": allow_clipboard, "allow_file_transfer": allow_file_transfer,
        "allow_usb": allow_usb, "record": record, "description": description,
    }  # fmt: skip
    c = client()
    res = c.post("/v1/desktop-pools", json=body)
    if v.human and not wait:
        say(f"desktop pool {name}: making {size} desktops (job {res['job']['id']})")
        return
    job = _finish(c, res, f"making {size} desktops of pool {name}", v, wait)
    if job is None:
        return
    made = (job.get("result") or {}).get("desktops", [])
    say(f"desktop pool {name}: {len(made)} desktops ({', '.join(made)}); {prestart} kept pre-started")


def _policy(p: dict[str, Any]) -> str:
    allowed = [w for w, k in (("clipboard", "allow_clipboard"), ("files", "allow_file_transfer"),
                              ("usb", "allow_usb")) if p[k]]  # fmt: skip
    return (", ".join(allowed) or "screen only") + (", recorded" if p.get("record") else "")


def _desktops(p: dict[str, Any]) -> str:
    desks = []
    for d in p["desktops"]:
        who = f" {d['user']} {time.strftime('%H:%M', time.localtime(d['since']))}" if d["since"] else ""
        desks.append(f"{d['vm']} {d['state']}{who}" + ("" if d["guest_ready"] or d["state"] != "free" else
                                                       f" ({d['vm_state']})"))  # fmt: skip
    return "\n".join(desks)


def _kind(p: dict[str, Any]) -> str:
    kind = "persistent" if p["persistent"] else "reset at sign-out"
    return kind + (f", idle {p['idle_minutes']} min" if p["idle_minutes"] else "")


DESKTOP_COLS = [
    Col("name", "pool"), Col("template"), Col("state"), Col("size"), Col("in_use", "in use"),
    Col("free_ready", "ready"), Col("prestart"), Col("persistent", "kind", _kind), Col("console", value=_policy),
    Col("desktops", text=_desktops, value=lambda p: [d["vm"] for d in p["desktops"]]),
    Col("idle_minutes", hidden=True), Col("record", hidden=True), Col("description", hidden=True),
]  # fmt: skip


@desktop_pool_app.command("list")
def list_pools(output: str = OUTPUT, column: list[str] = columns(DESKTOP_COLS), as_json: bool = JSON) -> None:
    """Desktop pools: size, in use, pre-started and ready, and who has which desktop."""
    v = view(output, column, as_json, DESKTOP_COLS)
    render(client().get("/v1/desktop-pools"), DESKTOP_COLS, v)


@desktop_pool_app.command("resize")
def resize(
    name: str,
    size: int = typer.Option(None, "--size", help="New number of desktops (free ones with the highest numbers go)."),
    prestart: int = typer.Option(None, "--prestart", help="New number kept pre-started."),
    output: str = OUTPUT,
    column: list[str] = columns(DESKTOP_COLS),
    as_json: bool = JSON,
) -> None:
    """Change a pool's size or the number of desktops kept pre-started (it waits for the new desktops)."""
    v = view(output, column, as_json, DESKTOP_COLS)
    validate_pool_name(name)
    c = client()
    res = c.patch(f"/v1/desktop-pools/{name}", json={"size": size, "prestart": prestart})
    if res.get("job"):
        follow(c, res["job"], f"resizing desktop pool {name}", console=out if v.table else err)
    p = c.get(f"/v1/desktop-pools/{name}")
    render_one(
        p,
        DESKTOP_COLS,
        v,
        human=lambda: say(f"desktop pool {name}: {p['size']} desktops, {p['prestart']} kept pre-started"),
    )


@desktop_pool_app.command("set")
def set_pool(
    name: str,
    record: bool = typer.Option(..., "--record/--no-record", help="Record the desktops' console sessions."),
) -> None:
    """Change a pool's settings: whether its console sessions are recorded (from the next console opened)."""
    validate_pool_name(name)
    c = client()
    c.patch(f"/v1/desktop-pools/{name}", json={"record": record})
    say(f"desktop pool {name}: console sessions {'recorded' if record else 'not recorded'}")


@desktop_pool_app.command("delete")
def delete(
    name: str,
    force: bool = typer.Option(False, "--force", help="Delete even while clinicians use its desktops."),
    wait: bool = WAIT,
    output: str = OUTPUT,
    column: list[str] = JOB_COLUMN,
    as_json: bool = JSON,
) -> None:
    """Delete a pool and its desktops (refused while desktops are in use unless --force)."""
    v = view(output, column, as_json, JOB_COLS)
    validate_pool_name(name)
    c = client()
    res = c.delete(f"/v1/desktop-pools/{name}", params={"force": force})
    if _finish(c, res, f"deleting desktop pool {name}", v, wait):
        say(f"desktop pool {name}: deleted with its desktops")
