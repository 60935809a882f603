"""``kasou snapshot create|list|revert|delete VM NAME``: snapshots as external qcow2 overlays (see docs/storage.md)."""

from __future__ import annotations

import time

import typer

from kasou.cli.common import client, say
from kasou.cli.output import JOB_COLS, JOB_COLUMN, JSON, OUTPUT, WAIT, Col, act, columns, render, view
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
    wait: bool = WAIT,
    output: str = OUTPUT,
    column: list[str] = JOB_COLUMN,
    as_json: bool = JSON,
) -> None:
    """Take a snapshot of a VM's disks (and, with --memory, of its running state)."""
    v = view(output, column, as_json, JOB_COLS)
    _names(vm, name)
    c = client()
    res = c.post(f"/v1/vms/{vm}/snapshots", json={"name": name, "memory": memory, "description": description})
    job = act(c, res["job"], f"snapshot {vm}/{name}", v, wait, queued=lambda j: f"vm {vm}: snapshot job {j['id']}")
    if job is None or not v.human:
        return
    r = job.get("result") or {}
    paused = f", guest paused {r['paused_ms']} ms" if memory and r.get("paused_ms") is not None else ""
    how = {"application": ", application-consistent: the guest agent froze its file systems",
           "crash": ", crash-consistent: no guest agent answered to freeze its file systems"}  # fmt: skip
    say(f"vm {vm}: snapshot {name} taken ({'disk and memory' if memory else 'disk'}{paused}"
        f"{how.get(r.get('consistency') or '', '')})")  # fmt: skip


SNAPSHOT_COLS = [
    Col("name"),
    Col("created_at", "time", lambda s: time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(s["created_at"]))),
    Col("memory"),
    Col("size_bytes", "size", lambda s: format_size(s["size_bytes"])),
    Col("vm_state", "vm was"),
    Col("state", text=lambda s: s["state"] + (" (newest)" if s["newest"] else "")),
    Col("newest", hidden=True),
    Col("description", hidden=True),
]


@snapshot_app.command("list")
def snapshot_list(
    vm: str, output: str = OUTPUT, column: list[str] = columns(SNAPSHOT_COLS), as_json: bool = JSON
) -> None:
    """A VM's snapshots, oldest first."""
    v = view(output, column, as_json, SNAPSHOT_COLS)
    _names(vm)
    render(client().get(f"/v1/vms/{vm}/snapshots"), SNAPSHOT_COLS, v)


@snapshot_app.command("revert")
def snapshot_revert(
    vm: str, name: str, wait: bool = WAIT, output: str = OUTPUT, column: list[str] = JOB_COLUMN, as_json: bool = JSON
) -> None:
    """Go back to the newest snapshot (a memory snapshot resumes the guest at that instant)."""
    v = view(output, column, as_json, JOB_COLS)
    _names(vm, name)
    c = client()
    res = c.post(f"/v1/vms/{vm}/snapshots/{name}/revert")
    job = act(c, res["job"], f"reverting {vm} to {name}", v, wait, queued=lambda j: f"vm {vm}: revert job {j['id']}")
    if job is not None and v.human:
        say(f"vm {vm}: reverted to snapshot {name}; {(job.get('result') or {}).get('state', 'done')}")


@snapshot_app.command("delete")
def snapshot_delete(
    vm: str, name: str, wait: bool = WAIT, output: str = OUTPUT, column: list[str] = JOB_COLUMN, as_json: bool = JSON
) -> None:
    """Delete a snapshot: its overlay is merged into the disk (while the VM runs)."""
    v = view(output, column, as_json, JOB_COLS)
    _names(vm, name)
    c = client()
    res = c.delete(f"/v1/vms/{vm}/snapshots/{name}")
    job = act(c, res["job"], f"deleting snapshot {vm}/{name}", v, wait,
              queued=lambda j: f"vm {vm}: snapshot delete job {j['id']}")  # fmt: skip
    if job is not None and v.human:
        say(f"vm {vm}: snapshot {name} deleted")
