"""``kasou pool`` and ``kasou disk``: storage pools and mirrored disks."""

from __future__ import annotations

from typing import Any

import typer
from rich.table import Table

from kasou.cli.common import client, out, say
from kasou.cli.output import JOB_COLS, JOB_COLUMN, JSON, OUTPUT, WAIT, Col, act, columns, render, view
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


POOL_COLS = [
    Col("pool"), Col("host"), Col("state"), Col("capacity_bytes", "capacity"), Col("allocated_bytes", "allocated"),
    Col("free_bytes", "free"), Col("provisioned_bytes", "provisioned"), Col("overcommit_ratio", "over-commit"),
    Col("path"), Col("shared", hidden=True), Col("overcommit", hidden=True), Col("error", hidden=True),
]  # fmt: skip


@pool_app.command("list")
def pool_list(output: str = OUTPUT, column: list[str] = columns(POOL_COLS), as_json: bool = JSON) -> None:
    """Pools: capacity, allocated (what files hold), free, provisioned (virtual sizes), over-commit ratio."""
    v = view(output, column, as_json, POOL_COLS)
    pools = client().get("/v1/pools")
    rows = [{**h, "pool": p["name"], "shared": p.get("shared"), "overcommit": p.get("overcommit")}
            for p in pools for h in p["hosts"]]  # fmt: skip  # a row per pool and host

    def human() -> None:
        t = Table("pool", "host", "state", "capacity", "allocated", "free", "provisioned", "over-commit", "path")
        for p in pools:
            for h in p["hosts"]:
                t.add_row(*_row(p, h))
        out.print(t)

    render(rows, POOL_COLS, v, human=human, data=pools)


@pool_app.command("delete")
def pool_delete(name: str) -> None:
    """Forget a pool no disk uses (its directory and files stay)."""
    validate_name(name, "pool")
    client().delete(f"/v1/pools/{name}")
    say(f"pool {name}: deleted")


def _second(d: dict[str, Any]) -> str:
    m = d.get("mirror")
    return "-" if not m else f"pool {m['pool']}: {m['path'] or 'lost ' + (m['failed'] or '')}"


DISK_COLS = [
    Col("id", "disk"), Col("size_bytes", "size", lambda d: format_size(d["size_bytes"])), Col("pool"), Col("path"),
    Col("mirror", value=lambda d: (d.get("mirror") or {}).get("state"),
        text=lambda d: (d.get("mirror") or {}).get("state") or "-"),
    Col("second_copy", "second copy", _second, value=lambda d: d.get("mirror")),
    Col("format", hidden=True), Col("backing", hidden=True), Col("linked", hidden=True),
]  # fmt: skip


@disk_app.command("list")
def disk_list(vm: str, output: str = OUTPUT, column: list[str] = columns(DISK_COLS), as_json: bool = JSON) -> None:
    """A VM's disks, their pools and the state of their mirrored copies."""
    v = view(output, column, as_json, DISK_COLS)
    validate_name(vm)
    render(client().get(f"/v1/vms/{vm}")["disks"], DISK_COLS, v)


@disk_app.command("rebuild")
def disk_rebuild(
    vm: str,
    disk: str,
    pool: str = typer.Option(..., "--pool", help="Pool of the new second copy."),
    wait: bool = WAIT,
    output: str = OUTPUT,
    column: list[str] = JOB_COLUMN,
    as_json: bool = JSON,
) -> None:
    """Build a new second copy of a mirrored disk (online: the guest keeps running and writing)."""
    v = view(output, column, as_json, JOB_COLS)
    validate_name(vm)
    c = client()
    res = c.post(f"/v1/vms/{vm}/disks/{disk}/rebuild", json={"pool": pool})
    job = act(c, res["job"], f"rebuilding {disk} of {vm} in pool {pool}", v, wait,
              queued=lambda j: f"disk {disk} of {vm}: rebuilding in pool {pool} (job {j['id']})")  # fmt: skip
    if job is None or not v.human:
        return
    r = job.get("result") or {}
    say(f"disk {disk} of {vm}: two copies again, the new one in pool {pool} "
        f"({r.get('seconds', '?')} s, {r.get('mib_s', '?')} MiB/s)")  # fmt: skip
