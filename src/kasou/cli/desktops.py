"""``kasou pool-desktop``: desktop pools (N linked clones of a template handed to clinicians at sign-in).

Not to be mixed up with ``kasou pool`` (storage pools).
"""

from __future__ import annotations

import time
from typing import Any

import typer
from rich.table import Table

from kasou.cli.common import client, fail, follow, out, print_json, say
from kasou.model.desktops import validate_pool_name

desktop_pool_app = typer.Typer(
    help="Desktop pools: desktop VMs as linked clones of a template, one per signed-in clinician, reset at sign-out.",
    no_args_is_help=True,
)


def _finish(c: Any, res: dict[str, Any], title: str) -> dict[str, Any]:
    job = follow(c, res["job"], title)
    if job.get("state") != "succeeded":
        fail((job.get("error") or {}).get("message", f"{title} failed"))
    return job


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
    wait: bool = typer.Option(True, "--wait/--no-wait"),
) -> None:
    """Define a desktop pool and make its desktops."""
    body: dict[str, Any] = {
        "name": name, "template": template, "size": size, "prestart": prestart, "persistent": persistent,
        "idle_minutes": idle_minutes, "allow_clipboard": allow_clipboard, "allow_file_transfer": allow_file_transfer,
        "allow_usb": allow_usb, "record": record, "description": description,
    }  # fmt: skip
    c = client()
    res = c.post("/v1/desktop-pools", json=body)
    if not wait:
        say(f"desktop pool {name}: making {size} desktops (job {res['job']['id']})")
        return
    job = _finish(c, res, f"making {size} desktops of pool {name}")
    made = (job.get("result") or {}).get("desktops", [])
    say(f"desktop pool {name}: {len(made)} desktops ({', '.join(made)}); {prestart} kept pre-started")


def _policy(p: dict[str, Any]) -> str:
    allowed = [w for w, k in (("clipboard", "allow_clipboard"), ("files", "allow_file_transfer"),
                              ("usb", "allow_usb")) if p[k]]  # fmt: skip
    return (", ".join(allowed) or "screen only") + (", recorded" if p.get("record") else "")


@desktop_pool_app.command("list")
def list_pools(as_json: bool = typer.Option(False, "--json")) -> None:
    """Desktop pools: size, in use, pre-started and ready, and who has which desktop."""
    pools = client().get("/v1/desktop-pools")
    if as_json:
        print_json(pools)
        return
    t = Table("pool", "template", "state", "size", "in use", "ready", "prestart", "kind", "console", "desktops")
    for p in pools:
        desks = []
        for d in p["desktops"]:
            who = f" {d['user']} {time.strftime('%H:%M', time.localtime(d['since']))}" if d["since"] else ""
            desks.append(f"{d['vm']} {d['state']}{who}" + ("" if d["guest_ready"] or d["state"] != "free" else
                                                           f" ({d['vm_state']})"))  # fmt: skip
        kind = "persistent" if p["persistent"] else "reset at sign-out"
        if p["idle_minutes"]:
            kind += f", idle {p['idle_minutes']} min"
        t.add_row(p["name"], p["template"], p["state"], str(p["size"]), str(p["in_use"]), str(p["free_ready"]),
                  str(p["prestart"]), kind, _policy(p), "\n".join(desks))  # fmt: skip
    out.print(t)


@desktop_pool_app.command("resize")
def resize(
    name: str,
    size: int = typer.Option(None, "--size", help="New number of desktops (free ones with the highest numbers go)."),
    prestart: int = typer.Option(None, "--prestart", help="New number kept pre-started."),
) -> None:
    """Change a pool's size or the number of desktops kept pre-started."""
    validate_pool_name(name)
    c = client()
    res = c.patch(f"/v1/desktop-pools/{name}", json={"size": size, "prestart": prestart})
    if res.get("job"):
        _finish(c, res, f"resizing desktop pool {name}")
    p = c.get(f"/v1/desktop-pools/{name}")
    say(f"desktop pool {name}: {p['size']} desktops, {p['prestart']} kept pre-started")


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
) -> None:
    """Delete a pool and its desktops (refused while desktops are in use unless --force)."""
    validate_pool_name(name)
    c = client()
    res = c.delete(f"/v1/desktop-pools/{name}", params={"force": force})
    _finish(c, res, f"deleting desktop pool {name}")
    say(f"desktop pool {name}: deleted with its desktops")
