"""``kasou pool`` and ``kasou disk``: storage pools and mirrored disks."""

from __future__ import annotations

from typing import Any

import typer
from rich.table import Table

from kasou.cli.common import client, fail, follow, out, print_json, say
from kasou.model.names import validate_name
from kasou.model.units import format_size

pool_app = typer.Typer(help="Storage pools: named places for disk images, with capacity and over-commit.",
                       no_args_is_help=True)  # fmt: skip
disk_app = typer.Typer(help="Disks of VMs: mirrored copies and their rebuild.", no_args_is_help=True)


@pool_app.command("create")
def pool_create(
    name: str,
    path: str = typer.Option(..., "--path", help="Its directory (made if missing)."),
    shared: bool = typer.Option(False, "--shared", help="Every host sees this directory (NFS, SAN file system)."),
    capacity: str = typer.Option(None, "--capacity", help="Its size, e.g. 500G (default: its file system's)."),
    overcommit: float = typer.Option(1.0, "--overcommit", help="Provisioned disks may reach capacity x this."),
    warn_free: int = typer.Option(10, "--warn-free", help="Warn when less than this % of the capacity is free."),
    description: str = typer.Option("", "--description"),
) -> None:
    """Define a storage pool."""
    body: dict[str, Any] = {
        "name": name, "path": path, "shared": shared, "capacity": capacity, "overcommit": overcommit,
        "warn_free_pct": warn_free, "description": description,
    }  # fmt: skip
    p = client().post("/v1/pools", json=body)
    say(f"pool {p['name']}: created at {p['path']}" + (" (shared)" if p["shared"] else ""))


def _row(p: dict[str, Any], h: dict[str, Any]) -> list[str]:
    if h["state"] in ("missing", "unreachable"):
        return [
            p["name"],
            h["host"],
            h["state"],
            "-",
            "-",
            "-",
            format_size(h["provisioned_bytes"]),
            "-",
            h["error"] or "",
        ]
    return [
        p["name"], h["host"], h["state"], format_size(h["capacity_bytes"]), format_size(h["allocated_bytes"]),
        format_size(h["free_bytes"]), format_size(h["provisioned_bytes"]),
        f"{h['overcommit_ratio']:.2f} (max {p['overcommit']:g})", h["path"] or "",
    ]  # fmt: skip


@pool_app.command("list")
def pool_list(as_json: bool = typer.Option(False, "--json")) -> None:
    """Pools: capacity, allocated (what files hold), free, provisioned (virtual sizes), over-commit ratio."""
    pools = client().get("/v1/pools")
    if as_json:
        print_json(pools)
        return
    t = Table("pool", "host", "state", "capacity", "allocated", "free", "provisioned", "over-commit", "path")
    for p in pools:
        for h in p["hosts"]:
            t.add_row(*_row(p, h))
    out.print(t)


@pool_app.command("delete")
def pool_delete(name: str) -> None:
    """Forget a pool no disk uses (its directory and files stay)."""
    validate_name(name, "pool")
    client().delete(f"/v1/pools/{name}")
    say(f"pool {name}: deleted")


@disk_app.command("list")
def disk_list(vm: str, as_json: bool = typer.Option(False, "--json")) -> None:
    """A VM's disks, their pools and the state of their mirrored copies."""
    validate_name(vm)
    disks = client().get(f"/v1/vms/{vm}")["disks"]
    if as_json:
        print_json(disks)
        return
    t = Table("disk", "size", "pool", "path", "mirror", "second copy")
    for d in disks:
        m = d.get("mirror")
        second = "-" if not m else f"pool {m['pool']}: {m['path'] or 'lost ' + (m['failed'] or '')}"
        t.add_row(d["id"], format_size(d["size_bytes"]), d["pool"], d["path"] or "-", m["state"] if m else "-", second)
    out.print(t)


@disk_app.command("rebuild")
def disk_rebuild(
    vm: str,
    disk: str,
    pool: str = typer.Option(..., "--pool", help="Pool of the new second copy."),
    wait: bool = typer.Option(True, "--wait/--no-wait"),
) -> None:
    """Build a new second copy of a mirrored disk (online: the guest keeps running and writing)."""
    validate_name(vm)
    c = client()
    res = c.post(f"/v1/vms/{vm}/disks/{disk}/rebuild", json={"pool": pool})
    if not wait:
        say(f"disk {disk} of {vm}: rebuilding in pool {pool} (job {res['job']['id']})")
        return
    job = follow(c, res["job"], f"rebuilding {disk} of {vm} in pool {pool}")
    r = job.get("result") or {}
    if job.get("state") != "succeeded":
        fail((job.get("error") or {}).get("message", "the rebuild failed"))
    say(f"disk {disk} of {vm}: two copies again, the new one in pool {pool} "
        f"({r.get('seconds', '?')} s, {r.get('mib_s', '?')} MiB/s)")  # fmt: skip
