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
    KEY_OPT,
    PAPER_OPT,
    VMS_OPT,
    drill,
    key_app,
    load_key,
    restore_all,
    server_app,
    server_isolate,
)
from kasou.cli.backup_policy import policy_app
from kasou.cli.common import client, fail, follow, out, parse_int, print_json, say
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
    wait: bool = typer.Option(True, "--wait/--no-wait"),
) -> None:
    """Back a VM up now (it keeps running); the new generation is verified before it counts."""
    c = client()
    res = c.post(f"/v1/vms/{_vm(vm)}/backups", json={"incremental": incremental})
    if not wait:
        say(f"vm {vm}: backup job {res['job']['id']}")
        return
    job = follow(c, res["job"], f"backing up {vm}", timeout=7200)
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


@backup_app.command("list")
def backup_list(
    vm: str,
    uuid: str = typer.Option(None, "--uuid", help=_UUID_HELP),
    server: bool = typer.Option(False, "--server", help="Those the backup server holds (with their locks)."),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """The VM's backup generations, oldest first (of the VM that holds the name now, unless --uuid)."""
    if server:
        held = client().get(f"/v1/vms/{_vm(vm)}/backups/server")
        if as_json:
            print_json(held)
            return
        st = Table("generation", "taken", "disks", "sent", "locked until", "verified", "damaged")
        for g in held:
            st.add_row(str(g["generation"]), _when(g.get("created")), format_size(int(g.get("bytes_logical", 0))),
                       format_size(int(g.get("bytes_sent", 0))), _when(g.get("locked_until")),
                       _when(g.get("verified_at")), str(len(g.get("damaged") or [])) or "-")  # fmt: skip
        out.print(st)
        return
    params: dict[str, Any] = {"server": "true", **({"uuid": uuid} if uuid else {})}
    gens = client().get(f"/v1/vms/{_vm(vm)}/backups", params=params)
    if as_json:
        print_json(gens)
        return
    t = Table("generation", "kind", "based on", "taken", "host", "disk", "file", "locked until", "verified",
              "copied to", "note")  # fmt: skip
    for g in gens:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(g["created_at"]))
        kind = g["kind"] + (" (scheduled)" if g["scheduled"] else "")
        copied = ", ".join(c["site"] for c in g.get("copied_to") or []) or "-"
        t.add_row(
            str(g["generation"]), kind, str(g["based_on"] or "-"), when, g["host"], format_size(g["size_bytes"]),
            format_size(g["file_bytes"]), _when(g.get("locked_until")), _when(g.get("verified_at")), copied,
            g["note"],
        )  # fmt: skip
    out.print(t)
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
    wait: bool = typer.Option(True, "--wait/--no-wait"),
) -> None:
    """Make a new (stopped) VM from a generation; a backup that fails verification is refused."""
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
    if not wait:
        say(f"vm {as_name}: restore job {res['job']['id']}")
        return
    follow(c, res["job"], f"restoring {vm} generation {gen}", timeout=7200)
    where = "the backup server's generation" if from_server else "generation"
    say(f"vm {as_name}: restored from {where} {gen} of {vm} on {res['vm']['host']} (stopped)")


@backup_app.command("status")
def backup_status(
    check: bool = typer.Option(False, "--check", help="Exit 1 if any VM's backups are not ok (for monitoring)."),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Per VM: its newest backup, its age against its schedule, and its copy on the backup server."""
    rows = client().get("/v1/backups/status")
    if as_json:
        print_json(rows)
    else:
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
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Bring every VM back from the backup server (a site rebuilt after an attack), highest HA priority first,
    each under its own name (which must be free), from its newest generation (before --before)."""
    if not from_server:
        fail("restore-all reads the backup server: give --from-server (and --key or --paper-key)")
    restore_all(key, paper_key, before, vms, start, dry_run, as_json, parallel)


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
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Prove the backups restore: each VM's newest generation on the backup server is restored onto an isolated
    network, booted, optionally checked, and removed; the result is kept per VM (backup status) and is an event."""
    drill(key, paper_key, vms, before, network, list(check or []), timeout, as_json)


@backup_app.command("schedule")
def backup_schedule(
    vm: str,
    daily: str = typer.Option(None, "--daily", help="Back it up every day at HH:MM (the host's local time)."),
    keep: str = typer.Option(None, "--keep", help="Keep this many generations (default: KASOU_BACKUP_KEEP, 7)."),
    off: bool = typer.Option(False, "--off", help="No scheduled backups any more (retention stays)."),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Show or set a VM's daily backup schedule and its retention."""
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
    if as_json:
        print_json(p)
        return
    when = f"daily at {p['daily']}" if p["daily"] else "no schedule"
    keep_text = f"keeps {p['keep']} generations" + (" (the default)" if p["keep_is_default"] else "")
    say(f"vm {vm}: backups {when}, {keep_text}")
