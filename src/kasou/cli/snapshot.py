"""``kasou snapshot create|list|revert|delete VM NAME``: snapshots as external qcow2 overlays (see docs/storage.md)."""

from __future__ import annotations

import time

import typer
from rich.table import Table

from kasou.cli.common import client, follow, out, print_json, say
from kasou.model.names import validate_name
from kasou.model.snapshots import validate_snapshot_name
from kasou.model.units import format_size

snapshot_app = typer.Typer(
    help="VM snapshots (disk, or disk and memory): create, list, revert to the newest, delete (merge).",
    no_args_is_help=True,
)


def _names(vm: str, snapshot: str | None = None) -> None:
    """Check names here, not in the URL: 'a/b' would be a path of its own."""
    validate_name(vm)
    if snapshot is not None:
        validate_snapshot_name(snapshot)


@snapshot_app.command("create")
def snapshot_create(
    vm: str,
    name: str,
    memory: bool = typer.Option(False, "--memory", help="Also save the RAM and device state (a running VM)."),
    description: str = typer.Option("", "--description"),
    wait: bool = typer.Option(True, "--wait/--no-wait"),
) -> None:
    """Take a snapshot of a VM's disks (and, with --memory, of its running state)."""
    _names(vm, name)
    c = client()
    res = c.post(f"/v1/vms/{vm}/snapshots", json={"name": name, "memory": memory, "description": description})
    if not wait:
        say(f"vm {vm}: snapshot job {res['job']['id']}")
        return
    job = follow(c, res["job"], f"snapshot {vm}/{name}")
    r = job.get("result") or {}
    paused = f", guest paused {r['paused_ms']} ms" if memory and r.get("paused_ms") is not None else ""
    how = {"application": ", application-consistent: the guest agent froze its file systems",
           "crash": ", crash-consistent: no guest agent answered to freeze its file systems"}  # fmt: skip
    say(f"vm {vm}: snapshot {name} taken ({'disk and memory' if memory else 'disk'}{paused}"
        f"{how.get(r.get('consistency') or '', '')})")  # fmt: skip


@snapshot_app.command("list")
def snapshot_list(vm: str, as_json: bool = typer.Option(False, "--json")) -> None:
    """A VM's snapshots, oldest first."""
    _names(vm)
    snaps = client().get(f"/v1/vms/{vm}/snapshots")
    if as_json:
        print_json(snaps)
        return
    t = Table("name", "time", "memory", "size", "vm was", "state")
    for s in snaps:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(s["created_at"]))
        state = s["state"] + (" (newest)" if s["newest"] else "")
        t.add_row(s["name"], when, "yes" if s["memory"] else "no", format_size(s["size_bytes"]), s["vm_state"], state)
    out.print(t)


@snapshot_app.command("revert")
def snapshot_revert(vm: str, name: str, wait: bool = typer.Option(True, "--wait/--no-wait")) -> None:
    """Go back to the newest snapshot (a memory snapshot resumes the guest at that instant)."""
    _names(vm, name)
    c = client()
    res = c.post(f"/v1/vms/{vm}/snapshots/{name}/revert")
    if not wait:
        say(f"vm {vm}: revert job {res['job']['id']}")
        return
    job = follow(c, res["job"], f"reverting {vm} to {name}")
    say(f"vm {vm}: reverted to snapshot {name}; {(job.get('result') or {}).get('state', 'done')}")


@snapshot_app.command("delete")
def snapshot_delete(vm: str, name: str, wait: bool = typer.Option(True, "--wait/--no-wait")) -> None:
    """Delete a snapshot: its overlay is merged into the disk (while the VM runs)."""
    _names(vm, name)
    c = client()
    res = c.delete(f"/v1/vms/{vm}/snapshots/{name}")
    if not wait:
        say(f"vm {vm}: snapshot delete job {res['job']['id']}")
        return
    follow(c, res["job"], f"deleting snapshot {vm}/{name}")
    say(f"vm {vm}: snapshot {name} deleted")
