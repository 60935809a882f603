"""``kasou backup``: backups kept in generations (create, list, restore as a new VM, schedule and retention)."""

from __future__ import annotations

import json
import time
from pathlib import Path, PurePosixPath
from typing import Any

import typer
from rich.table import Table

from kasou.cli.backup_offsite import (
    BEFORE_OPT,
    DRILL_COLS,
    KEY_OPT,
    PAPER_OPT,
    PLAN_COLS,
    VMS_OPT,
    drill,
    key_app,
    load_key,
    restore_all,
    server_app,
    server_isolate,
)
from kasou.cli.backup_policy import POLICY_COLS, policy_app
from kasou.cli.common import client, fail, out, parse_int, say
from kasou.cli.output import (
    JOB_COLS,
    JOB_COLUMN,
    JSON,
    OUTPUT,
    WAIT,
    Col,
    act,
    cols,
    columns,
    render,
    render_one,
    view,
)
from kasou.model.names import validate_name
from kasou.model.units import format_size

backup_app = typer.Typer(
    help="Backups of VMs kept in generations (full and incremental), restored as new VMs.", no_args_is_help=True
)
backup_app.add_typer(key_app, name="key")
backup_app.add_typer(server_app, name="server")
backup_app.add_typer(policy_app, name="policy")
backup_app.command("isolate")(server_isolate)  # the same as "backup server isolate", as a response plan names it


def _vm(name: str) -> str:
    validate_name(name)  # here, not in the URL: "a/b" would be a path of its own
    return name


@backup_app.command("create")
def backup_create(
    vm: str,
    incremental: bool = typer.Option(
        False, "--incremental", help="Copy only what changed since the latest generation (else a full backup)."
    ),
    wait: bool = WAIT,
    output: str = OUTPUT,
    column: list[str] = JOB_COLUMN,
    as_json: bool = JSON,
) -> None:
    """Back a VM up now (it keeps running); the new generation is verified before it counts."""
    v = view(output, column, as_json, JOB_COLS)
    c = client()
    res = c.post(f"/v1/vms/{_vm(vm)}/backups", json={"incremental": incremental})
    job = act(c, res["job"], f"backing up {vm}", v, wait, timeout=7200,
              queued=lambda j: f"vm {vm}: backup job {j['id']}")  # fmt: skip
    if job is None or not v.human:
        return
    r: dict[str, Any] = job.get("result") or {}
    line = (
        f"vm {vm}: backup generation {r.get('generation')} ({r.get('kind')}, "
        f"{format_size(int(r.get('file_bytes', 0)))} written{_consistency(r.get('consistency'))})"
    )
    if r.get("pruned"):
        line += f"; retention pruned generation {', '.join(str(g) for g in r['pruned'])}"
    say(line)
    if r.get("offsite"):
        o = r["offsite"]
        read = "changed chunks only" if o["incremental"] else "whole disks"
        say(f"copied to the backup server: {format_size(int(o['bytes_sent']))} sent of "
            f"{format_size(int(o['bytes_read']))} read ({read}), "
            f"locked until {_when(o.get('locked_until'))}")  # fmt: skip
    elif r.get("offsite_error"):
        say(f"warning: not copied to the backup server: {r['offsite_error']}")
    if r.get("note"):
        say(f"note: {r['note']}")


def _consistency(c: str | None) -> str:
    """How a running VM's point in time was taken: frozen by its guest agent, or not (None: a stopped VM's)."""
    if c == "application":
        return ", application-consistent: the guest agent froze its file systems"
    if c == "crash":
        return ", crash-consistent: no guest agent answered to freeze its file systems"
    return ""


_UUID_HELP = "Those of the earlier (deleted) VM of that name with this uuid (administrators and operators)."


def _when(t: float | None) -> str:
    return "-" if t is None else time.strftime("%Y-%m-%d %H:%M", time.localtime(t))


HELD_COLS = [
    Col("generation"), Col("created", "taken", lambda g: _when(g.get("created"))),
    Col("bytes_logical", "disks", lambda g: format_size(int(g.get("bytes_logical", 0)))),
    Col("bytes_sent", "sent", lambda g: format_size(int(g.get("bytes_sent", 0)))),
    Col("locked_until", "locked until", lambda g: _when(g.get("locked_until"))),
    Col("verified_at", "verified", lambda g: _when(g.get("verified_at"))),
    Col("damaged", text=lambda g: str(len(g.get("damaged") or [])) or "-"),
]  # fmt: skip
GEN_COLS = [
    Col("generation"), Col("kind", text=lambda g: g["kind"] + (" (scheduled)" if g["scheduled"] else "")),
    Col("based_on", "based on"),
    Col("created_at", "taken", lambda g: time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(g["created_at"]))),
    Col("host"), Col("size_bytes", "disk", lambda g: format_size(g["size_bytes"])),
    Col("file_bytes", "file", lambda g: format_size(g["file_bytes"])),
    Col("locked_until", "locked until", lambda g: _when(g.get("locked_until"))),
    Col("verified_at", "verified", lambda g: _when(g.get("verified_at"))),
    Col("copied_to", "copied to", lambda g: ", ".join(c["site"] for c in g.get("copied_to") or []) or "-"),
    Col("note", text=lambda g: g["note"]),
    *cols(hidden=("vm", "vm_uuid", "department", "scheduled", "consistency", "running", "duration_s", "disks",
                  "server_generation", "server_error")),
]  # fmt: skip


@backup_app.command("list")
def backup_list(
    vm: str,
    uuid: str = typer.Option(None, "--uuid", help=_UUID_HELP),
    server: bool = typer.Option(False, "--server", help="Those the backup server holds (with their locks)."),
    output: str = OUTPUT,
    column: list[str] = columns(GEN_COLS + [c for c in HELD_COLS if c.key not in {g.key for g in GEN_COLS}]),
    as_json: bool = JSON,
) -> None:
    """The VM's backup generations, oldest first (of the VM that holds the name now, unless --uuid)."""
    v = view(output, column, as_json, HELD_COLS if server else GEN_COLS)
    if server:
        render(client().get(f"/v1/vms/{_vm(vm)}/backups/server"), HELD_COLS, v)
        return
    params: dict[str, Any] = {"server": "true", **({"uuid": uuid} if uuid else {})}
    gens = client().get(f"/v1/vms/{_vm(vm)}/backups", params=params)
    render(gens, GEN_COLS, v)
    if not v.human:
        return
    errors = {g["server_error"] for g in gens if g.get("server_error")}
    for e in errors:
        say(f"warning: {e}; locks, verification and second sites are not known")


@backup_app.command("restore")
def backup_restore(
    vm: str,
    generation: str,
    as_name: str = typer.Option(..., "--as", help="The new VM's name (it must not exist)."),
    uuid: str = typer.Option(
        None, "--uuid", help="A generation of the earlier (deleted) VM of that name with this uuid."
    ),
    from_server: bool = typer.Option(False, "--from-server", help="From the backup server's generation."),
    key: str = KEY_OPT,
    paper_key: bool = PAPER_OPT,
    host: str = typer.Option(None, "--host", help="Where the restored VM goes (from the backup server)."),
    wait: bool = WAIT,
    output: str = OUTPUT,
    column: list[str] = JOB_COLUMN,
    as_json: bool = JSON,
) -> None:
    """Make a new (stopped) VM from a generation; a backup that fails verification is refused."""
    v = view(output, column, as_json, JOB_COLS)
    gen = parse_int(generation, "generation")
    validate_name(as_name)
    body: dict[str, Any] = {"as": as_name}
    if uuid:
        body["uuid"] = uuid
    if from_server:
        body.update(from_server=True, key=json.loads(load_key(key, paper_key).to_json()), host=host)
    elif key or paper_key or host:
        fail("--key, --paper-key and --host are for a restore --from-server")
    c = client()
    res = c.post(f"/v1/vms/{_vm(vm)}/backups/{gen}/restore", json=body)
    job = act(c, res["job"], f"restoring {vm} generation {gen}", v, wait, timeout=7200,
              queued=lambda j: f"vm {as_name}: restore job {j['id']}")  # fmt: skip
    if job is None or not v.human:
        return
    where = "the backup server's generation" if from_server else "generation"
    say(f"vm {as_name}: restored from {where} {gen} of {vm} on {res['vm']['host']} (stopped)")


STATUS_COLS = cols("vm", "state", "last_generation", "last_at", "age_s", "offsite_generation", "locked_until",
                   "verified_at", "copied_to", "drill_at", "drill_ok", "reason", hidden=("schedule", "lock_days",
                                                                                        "drill"))  # fmt: skip


@backup_app.command("status")
def backup_status(
    check: bool = typer.Option(False, "--check", help="Exit 1 if any VM's backups are not ok (for monitoring)."),
    output: str = OUTPUT,
    column: list[str] = columns(STATUS_COLS),
    as_json: bool = JSON,
) -> None:
    """Per VM: its newest backup, its age against its schedule, and its copy on the backup server."""
    v = view(output, column, as_json, STATUS_COLS)
    rows = client().get("/v1/backups/status")

    def human() -> None:
        t = Table("vm", "state", "newest", "taken", "age", "on the backup server", "locked until", "verified",
                  "second site", "drill", "why")  # fmt: skip
        for s in rows:
            age = "-" if s["age_s"] is None else f"{s['age_s'] / 3600:.1f} h"
            drilled = (
                "-"
                if s.get("drill_at") is None
                else f"{'passed' if s['drill_ok'] else 'FAILED'} {_when(s['drill_at'])}"
            )
            t.add_row(s["vm"], s["state"], str(s["last_generation"] or "-"), _when(s["last_at"]), age,
                      str(s["offsite_generation"] or "-"), _when(s["locked_until"]), _when(s.get("verified_at")),
                      _sites(s.get("copied_to")), drilled, s["reason"])  # fmt: skip
        out.print(t)

    render(rows, STATUS_COLS, v, human=human)
    bad = [s["vm"] for s in rows if s["state"] != "ok"]
    if check and bad:
        fail(f"backups not ok for {len(bad)} VM{'s' if len(bad) > 1 else ''}: {', '.join(bad)}")


def _sites(copied: list[dict[str, Any]] | None) -> str:
    return ", ".join(f"{c['site']} {_when(c.get('at'))}" for c in copied or []) or "-"


@backup_app.command("restore-file")
def backup_restore_file(
    vm: str,
    generation: str,
    path: str,
    to: Path = typer.Option(..., "--to", help="The directory the file is written to (as its own name)."),
    key: str = KEY_OPT,
    paper_key: bool = PAPER_OPT,
    disk: str = typer.Option(None, "--disk", help="The disk it is on (default: the first)."),
) -> None:
    """One file from a generation on the backup server (read-only), e.g. a ward's export a user deleted."""
    gen = parse_int(generation, "generation")
    dest = to / PurePosixPath(path).name
    if dest.exists():
        fail(f"{dest} exists: a restored file never replaces one")
    body = {"path": path, "key": json.loads(load_key(key, paper_key).to_json()), "disk": disk}
    data = client().post_bytes(f"/v1/vms/{_vm(vm)}/backups/{gen}/file", json=body, timeout=3600)
    to.mkdir(parents=True, exist_ok=True)
    with open(dest, "xb") as f:
        f.write(data)
    say(f"{path} of {vm} generation {gen}: {format_size(len(data))} written to {dest}")


@backup_app.command("restore-all")
def backup_restore_all(
    from_server: bool = typer.Option(False, "--from-server", help="From the backup server (the only source)."),
    key: str = KEY_OPT,
    paper_key: bool = PAPER_OPT,
    before: str = BEFORE_OPT,
    vms: str = VMS_OPT,
    start: bool = typer.Option(False, "--start", help="Start each VM once it is restored."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Only show what would be restored, in order."),
    parallel: int = typer.Option(
        1, "--parallel", help="Restore this many at once (started in priority order; restores are CPU-bound)."
    ),
    output: str = OUTPUT,
    column: list[str] = columns(PLAN_COLS),
    as_json: bool = JSON,
) -> None:
    """Bring every VM back from the backup server (a site rebuilt after an attack), highest HA priority first,
    each under its own name (which must be free), from its newest generation (before --before)."""
    v = view(output, column, as_json, PLAN_COLS)
    if not from_server:
        fail("restore-all reads the backup server: give --from-server (and --key or --paper-key)")
    restore_all(key, paper_key, before, vms, start, dry_run, v, parallel)


@backup_app.command("drill")
def backup_drill(
    key: str = KEY_OPT,
    paper_key: bool = PAPER_OPT,
    vms: str = VMS_OPT,
    before: str = BEFORE_OPT,
    network: str = typer.Option("drill", "--network", help="The isolated network the copies boot on (made if new)."),
    check: list[str] = typer.Option(
        None, "--check", help="VM=COMMAND run in the restored guest by its guest agent; must exit 0 (repeatable)."
    ),
    timeout: float = typer.Option(900.0, "--timeout", help="Seconds per VM for restore, boot and check."),
    output: str = OUTPUT,
    column: list[str] = columns(DRILL_COLS),
    as_json: bool = JSON,
) -> None:
    """Prove the backups restore: each VM's newest generation on the backup server is restored onto an isolated
    network, booted, optionally checked, and removed; the result is kept per VM (backup status) and is an event."""
    drill(key, paper_key, vms, before, network, list(check or []), timeout, view(output, column, as_json, DRILL_COLS))


@backup_app.command("schedule")
def backup_schedule(
    vm: str,
    daily: str = typer.Option(None, "--daily", help="Back it up every day at HH:MM (the host's local time)."),
    keep: str = typer.Option(None, "--keep", help="Keep this many generations (default: KASOU_BACKUP_KEEP, 7)."),
    off: bool = typer.Option(False, "--off", help="No scheduled backups any more (retention stays)."),
    output: str = OUTPUT,
    column: list[str] = columns(POLICY_COLS),
    as_json: bool = JSON,
) -> None:
    """Show or set a VM's daily backup schedule and its retention."""
    v = view(output, column, as_json, POLICY_COLS)
    path = f"/v1/vms/{_vm(vm)}/backup-policy"
    if daily is None and keep is None and not off:
        p = client().get(path)
    else:
        if daily is not None and off:
            fail("give either --daily or --off, not both")
        body: dict[str, Any] = {"off": off}
        if daily is not None:
            body["daily"] = daily
        if keep is not None:
            body["keep"] = parse_int(keep, "keep")
        p = client().patch(path, json=body)
    when = f"daily at {p['daily']}" if p["daily"] else "no schedule"
    keep_text = f"keeps {p['keep']} generations" + (" (the default)" if p["keep_is_default"] else "")
    render_one(p, POLICY_COLS, v, human=lambda: say(f"vm {vm}: backups {when}, {keep_text}"))
