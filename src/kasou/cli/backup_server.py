"""``kasou backup-server``: run and look after a backup server (docs/backup-server.md).

Every command here works on the data directory itself (``--dir``, or ``KASOU_BACKUP_SERVER_DIR``), on the
backup server's own machine: retention, policy, clients, verification, sync and export are not reachable
over its API.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

import typer
from rich.table import Table

from kasou.cli.common import fail, out
from kasou.cli.output import COLUMN, JSON, OUTPUT, Col, cols, columns, render, render_one, view
from kasou.errors import InvalidSpec
from kasou.model.units import format_size
from kasou.vault import policy as vpolicy
from kasou.vault import tlscert
from kasou.vault.export import Copied
from kasou.vault.store import Store

backup_server_app = typer.Typer(
    help="The backup server: generations the hypervisors cannot erase or read (run on the backup server).",
    no_args_is_help=True,
)
client_app = typer.Typer(help="The clients (hypervisors, second sites) and their tokens.", no_args_is_help=True)
policy_app = typer.Typer(help="Retention and lock policy.", no_args_is_help=True)
key_app = typer.Typer(help="The backup keys generations must be encrypted to.", no_args_is_help=True)
backup_server_app.add_typer(client_app, name="client")
backup_server_app.add_typer(key_app, name="key")
backup_server_app.add_typer(policy_app, name="policy")
timetable_app = typer.Typer(help="What serve runs by itself: sync from a primary, prune, verify.", no_args_is_help=True)
backup_server_app.add_typer(timetable_app, name="timetable")

ENV_DIR = "KASOU_BACKUP_SERVER_DIR"
DEFAULT_PORT = 8472
DirOpt = typer.Option(None, "--dir", envvar=ENV_DIR, help=f"The data directory (default: ${ENV_DIR}).")


def say(line: str) -> None:
    """One plain line, as :func:`kasou.cli.common.say` but with no emoji codes either: a fingerprint's
    ``:AB:`` or ``:CD:`` would otherwise print as a pictogram."""
    out.print(line, markup=False, highlight=False, soft_wrap=True, emoji=False)


def _dir(d: Path | None) -> Path:
    if d is None:
        fail(f"give the data directory: --dir DIR or {ENV_DIR}")
    return d


def _store(d: Path | None) -> Store:
    return Store(_dir(d))


def _when(t: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(t)) if t else "-"


@backup_server_app.command("init")
def init(
    directory: Path = DirOpt,
    name: str = typer.Option(..., "--name", help="This backup server's name (in its certificate)."),
) -> None:
    """Make a data directory: its id, its own self-signed certificate (prints the fingerprint clients pin)."""
    root = _dir(directory)
    existed = root.exists()
    store = Store.create(root, name)
    try:
        fp = tlscert.make_certificate(root / "tls", name)
        vpolicy.save_policy(store, vpolicy.Policy())
    except BaseException:  # nothing half-made is left: the directory as it was (absent, or empty)
        for p in list(root.iterdir()):
            shutil.rmtree(p) if p.is_dir() else p.unlink()
        if not existed:
            root.rmdir()
        raise
    say(f"backup server {name}: data directory {root}")
    say(f"certificate fingerprint (SHA-256): {tlscert.display(fp)}")
    if not store.immutable:
        say(
            "note: this file system does not keep the immutable flag (chattr +i): put the data directory on ext4 or XFS"
        )
    say(f"next: kasou backup-server client add NAME --role writer --dir {root}")


@backup_server_app.command("serve")
def serve(
    directory: Path = DirOpt,
    listen: str = typer.Option(f"0.0.0.0:{DEFAULT_PORT}", "--listen", help="HOST:PORT to serve the API on."),
    plain_http: bool = typer.Option(False, "--plain-http", help="Plain HTTP, on a loopback address only."),
) -> None:
    """Serve the API (HTTPS with the server's own certificate) in the foreground."""
    import uvicorn

    from kasou.serving import is_loopback, log_to_stderr, uvicorn_settings
    from kasou.vault.app import create_app

    store = _store(directory)
    host, _, port_text = listen.rpartition(":")
    host = host.strip("[]")
    if not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise InvalidSpec(f"--listen must be HOST:PORT, not {listen!r}", field="listen")
    if plain_http and not is_loopback(host):
        raise InvalidSpec("--plain-http only on a loopback address (127.0.0.1 or ::1)", field="listen")
    store.probe_immutable()
    log_to_stderr("backup-server")
    tls: dict[str, Any] = {}
    if not plain_http:
        tls = {"ssl_certfile": str(store.root / "tls" / "cert.pem"), "ssl_keyfile": str(store.root / "tls" / "key.pem")}
    store.event("serving", listen=listen, tls=not plain_http)
    uvicorn.run(
        create_app(store, timetable=True),
        host=host,
        port=int(port_text),
        log_level="warning",
        **uvicorn_settings(),
        **tls,
    )


SHOW_COLS = cols("name", "server_id", "directory", "created", "fingerprint", "immutable", "isolated", "clients", "keys",
                 "vms", "generations", "chunks", "chunk_bytes")  # fmt: skip


@backup_server_app.command("show")
def show(
    directory: Path = DirOpt, output: str = OUTPUT, column: list[str] = columns(SHOW_COLS), as_json: bool = JSON
) -> None:
    """This backup server: its name, id, certificate fingerprint, whether its files can be made immutable."""
    v = view(output, column, as_json, SHOW_COLS)
    store = _store(directory)
    info = store.info()
    chunks = sizes = 0
    for _cid, p in store.chunk_files():
        chunks += 1
        sizes += p.stat().st_size
    gens = sum(len(store.generation_numbers(vm)) for vm in store.vms())
    data = {
        "name": info["name"],
        "server_id": info["server_id"],
        "directory": str(store.root),
        "created": info["created"],
        "fingerprint": tlscert.display(tlscert.cert_fingerprint(store.root / "tls")),
        "immutable": store.probe_immutable(),
        "isolated": store.isolated,
        "clients": len(store.clients()),
        "keys": ", ".join(store.allowed_keys()) or "any (allow the site's: kasou backup-server key allow FP)",
        "vms": len(store.vms()),
        "generations": gens,
        "chunks": chunks,
        "chunk_bytes": sizes,
    }
    if not v.human:
        render_one(data, SHOW_COLS, v)
        return
    data["created"] = _when(info["created"])
    data["chunk_bytes"] = format_size(sizes)
    data["immutable"] = "yes (chattr +i)" if data["immutable"] else "no: this file system does not keep the flag"
    for k, x in data.items():
        say(f"{k:12} {x}")


@backup_server_app.command("isolate")
def isolate(rejoin: bool = typer.Option(False, "--rejoin", help="Serve the clients again."),
            directory: Path = DirOpt) -> None:  # fmt: skip
    """Cut this backup server off from every hypervisor and second site at once (the first step of a cyber-attack
    response plan): its API refuses every request until --rejoin. Run here, on the backup server."""
    store = _store(directory)
    store.set_isolated(not rejoin)
    if rejoin:
        say("the backup server serves its clients again")
    else:
        say("the backup server is isolated: every client is refused (kasou backup-server isolate --rejoin to undo)")


# -- keys ----------------------------------------------------------------------------------------


@key_app.command("allow")
def key_allow(fingerprint: str, directory: Path = DirOpt) -> None:
    """Accept generations encrypted to this backup key (``kasou backup key create`` printed its fingerprint);
    once one key is allowed, generations encrypted to any other are refused."""
    _store(directory).allow_key(fingerprint.strip().lower())
    say(f"generations encrypted to key {fingerprint} are accepted; any other key is refused")


@key_app.command("remove")
def key_remove(fingerprint: str, directory: Path = DirOpt) -> None:
    """Stop accepting new generations encrypted to this key (those held stay)."""
    _store(directory).disallow_key(fingerprint.strip().lower())
    say(f"key {fingerprint} is no longer accepted for new generations")


KEY_COLS = cols("fingerprint")


@key_app.command("list")
def key_list(
    directory: Path = DirOpt, output: str = OUTPUT, column: list[str] = columns(KEY_COLS), as_json: bool = JSON
) -> None:
    """The backup keys whose generations are accepted (none: any)."""
    v = view(output, column, as_json, KEY_COLS)
    keys = _store(directory).allowed_keys()
    human = lambda: say("\n".join(keys) if keys else "any key is accepted (none allowed yet)")  # noqa: E731
    render([{"fingerprint": k} for k in keys], KEY_COLS, v, human=human, data=keys)


# -- clients -------------------------------------------------------------------------------------


@client_app.command("add")
def client_add(
    name: str,
    role: str = typer.Option(..., "--role", help="writer (a hypervisor's agent) or reader (a second site, a restore)."),
    directory: Path = DirOpt,
) -> None:
    """Issue a token to a new client; it is printed once (the server keeps only its hash)."""
    token = _store(directory).add_client(name, role)
    say(f"client {name} ({role}): token {token}")
    say("(shown only now: give it to the client; the server keeps only its hash)")


CLIENT_COLS = [Col("name"), Col("role"), Col("created", "added", lambda c: _when(c.get("created")))]


@client_app.command("list")
def client_list(
    directory: Path = DirOpt, output: str = OUTPUT, column: list[str] = columns(CLIENT_COLS), as_json: bool = JSON
) -> None:
    """The clients and their roles."""
    v = view(output, column, as_json, CLIENT_COLS)
    render(_store(directory).clients(), CLIENT_COLS, v)


@client_app.command("remove")
def client_remove(name: str, directory: Path = DirOpt) -> None:
    """Revoke a client's token."""
    _store(directory).remove_client(name)
    say(f"client {name}: removed")


# -- policy --------------------------------------------------------------------------------------


@policy_app.command("set")
def policy_set(
    vm: str = typer.Option(None, "--vm", help="One VM's policy (else the default)."),
    keep_daily: int = typer.Option(None, "--keep-daily"),
    keep_weekly: int = typer.Option(None, "--keep-weekly"),
    keep_monthly: int = typer.Option(None, "--keep-monthly"),
    lock_days: int = typer.Option(None, "--lock-days", help="New generations are locked this many days."),
    reset: bool = typer.Option(False, "--reset", help="The VM follows the default policy again."),
    directory: Path = DirOpt,
) -> None:
    """Set the retention and lock policy (a lock applies to generations added from now on)."""
    p = vpolicy.set_policy(
        _store(directory), vm, reset, keep_daily=keep_daily, keep_weekly=keep_weekly,
        keep_monthly=keep_monthly, lock_days=lock_days,
    )  # fmt: skip
    r = p.for_vm(vm) if vm else p.default
    say(f"policy of {vm or 'every VM (default)'}: {_retention(r)}")


def _retention(r: vpolicy.Retention) -> str:
    return f"keep {r.keep_daily} daily, {r.keep_weekly} weekly, {r.keep_monthly} monthly; locked {r.lock_days} days"


RETENTION_COLS = [Col("vm", "VM"), Col("keep_daily", "keep daily"), Col("keep_weekly", "keep weekly"),
                  Col("keep_monthly", "keep monthly"), Col("lock_days", "lock days")]  # fmt: skip


@policy_app.command("show")
def policy_show(
    directory: Path = DirOpt, output: str = OUTPUT, column: list[str] = columns(RETENTION_COLS), as_json: bool = JSON
) -> None:
    """The default policy and each VM's own."""
    v = view(output, column, as_json, RETENTION_COLS)
    p = vpolicy.load_policy(_store(directory))
    rows = [{"vm": name, "keep_daily": r.keep_daily, "keep_weekly": r.keep_weekly, "keep_monthly": r.keep_monthly,
             "lock_days": r.lock_days} for name, r in [("(default)", p.default), *sorted(p.vms.items())]]  # fmt: skip
    render(rows, RETENTION_COLS, v, data=p.to_dict())


# -- maintenance ---------------------------------------------------------------------------------


PRUNE_COLS = cols("vm", "generation", "keep", "reasons")


@backup_server_app.command("prune")
def prune(
    directory: Path = DirOpt,
    vm: str = typer.Option(None, "--vm"),
    dry_run: bool = typer.Option(False, "--dry-run", help="Say what would go; remove nothing."),
    output: str = OUTPUT,
    column: list[str] = columns(PRUNE_COLS),
    as_json: bool = JSON,
) -> None:
    """Apply the retention policy: remove the generations it does not keep (never a locked one)."""
    v = view(output, column, as_json, PRUNE_COLS)
    result = vpolicy.prune(_store(directory), dry_run=dry_run, vm=vm)
    if not v.human:
        rows = [{"vm": name, **d.__dict__} for name, ds in result.items() for d in ds]
        render(rows, PRUNE_COLS, v, data={name: [d.__dict__ for d in ds] for name, ds in result.items()})
        return
    t = Table("VM", "generation", "kept" if not dry_run else "would keep", "why")
    removed = 0
    for name, decisions in result.items():
        for d in decisions:
            removed += not d.keep
            t.add_row(name, str(d.generation), "yes" if d.keep else "no", ", ".join(d.reasons) or "-")
    out.print(t)
    say(f"{removed} generations {'would be ' if dry_run else ''}removed; chunks go with: kasou backup-server gc")


@backup_server_app.command("gc")
def gc(
    directory: Path = DirOpt,
    dry_run: bool = typer.Option(False, "--dry-run"),
) -> None:
    """Remove chunks no generation refers to, uploaded more than 24 hours ago."""
    r = vpolicy.gc(_store(directory), dry_run=dry_run)
    verb = "would remove" if dry_run else "removed"
    say(f"{verb} {r.removed} chunks ({format_size(r.removed_bytes)}); {r.referenced} referenced, "
        f"{r.kept_young} unreferenced but younger than 24 h")  # fmt: skip


@backup_server_app.command("verify")
def verify(
    directory: Path = DirOpt,
    vm: str = typer.Option(None, "--vm"),
    all_: bool = typer.Option(False, "--all", help="Every generation (else those never verified)."),
    since: float = typer.Option(None, "--since", help="Those not verified in the last DAYS days."),
) -> None:
    """Re-hash every chunk of generations against its stored SHA-256 (no key needed); exit 1 on damage."""
    if all_ and since is not None:
        raise InvalidSpec("give --all or --since, not both", field="since")
    results = vpolicy.verify(_store(directory), vm=vm, all_=all_, since_days=since)
    bad = [r for r in results if r.damaged]
    for r in bad:
        say(f"DAMAGED: {r.vm} generation {r.generation}: {len(r.damaged)} of {r.chunks} chunks (first {r.damaged[0]})")
    say(f"verified {len(results)} generations: {len(results) - len(bad)} sound, {len(bad)} damaged")
    if bad:
        raise typer.Exit(1)


# -- copies --------------------------------------------------------------------------------------


@backup_server_app.command("sync")
def sync(
    url: str = typer.Option(..., "--from", help="The primary backup server's URL (https://HOST:PORT)."),
    token: str = typer.Option(..., "--token", envvar="KASOU_BACKUP_SYNC_TOKEN", help="A reader token of it."),
    fingerprint: str = typer.Option(None, "--fingerprint", help="Its certificate's SHA-256 fingerprint."),
    vm: str = typer.Option(None, "--vm"),
    directory: Path = DirOpt,
) -> None:
    """Pull from a primary backup server every generation this one lacks (locked by this one's policy)."""
    from kasou.vault.sync import Primary
    from kasou.vault.sync import sync as run_sync

    store = _store(directory)
    primary = Primary(url, token, fingerprint)
    try:
        r = run_sync(store, primary, vm, progress=lambda s: say(f"copied {s}"))
    finally:
        primary.close()
    for name, gen, why in r.failed:
        say(f"not copied: {name} generation {gen}: {why}")
    for name, gen, why in r.unconfirmed:
        say(f"copied, but the primary was not told (the next sync tells it): {name} generation {gen}: {why}")
    say(f"{len(r.added)} generations copied ({r.chunks} chunks, {format_size(r.chunk_bytes)}), {len(r.failed)} failed")
    if r.failed:
        raise typer.Exit(1)


def _copied(r: Copied, verb: str) -> None:
    """What an export or import did: each generation skipped and why, then the totals; exit 1 if any was skipped."""
    for name, gen, why in r.skipped:
        say(f"not {verb.split()[0]}: {name} generation {gen}: {why}")
    say(f"{len(r.generations)} generations {verb} ({r.chunks} chunks, {format_size(r.chunk_bytes)})")
    if r.skipped:
        raise typer.Exit(1)


@backup_server_app.command("export")
def export(
    to: Path = typer.Option(..., "--to", help="A directory on removable media."),
    vm: str = typer.Option(None, "--vm"),
    directory: Path = DirOpt,
) -> None:
    """Copy generations to removable media (with a README.txt on how to import them)."""
    from kasou.vault.export import export as run_export

    _copied(run_export(_store(directory), to, vm), f"exported to {to}")


@backup_server_app.command("import")
def import_(
    src: Path = typer.Option(..., "--from", help="A directory written by export."),
    vm: str = typer.Option(None, "--vm"),
    directory: Path = DirOpt,
) -> None:
    """Add the generations of an export this server lacks (each chunk checked, locked by this server's policy)."""
    from kasou.vault.export import import_from

    _copied(import_from(_store(directory), src, vm), "imported")


HELD_COLS = cols("vm", "generation", "created", "received", "disks", "bytes_sent", "locked_until", "verified_at",
                 "damaged", "synced_from")  # fmt: skip


@backup_server_app.command("list")
def list_(
    directory: Path = DirOpt,
    vm: str = typer.Option(None, "--vm"),
    output: str = OUTPUT,
    column: list[str] = columns(HELD_COLS),
    as_json: bool = JSON,
) -> None:
    """The generations held, with their locks and verification."""
    v = view(output, column, as_json, HELD_COLS)
    store = _store(directory)
    rows = []
    for name in [vm] if vm else store.vms():
        for gen in store.generation_numbers(name):
            idx = store.index(name, gen)
            st = store.state_fields(name, gen)
            rows.append({
                "vm": name, "generation": gen, "created": idx["created"], "received": st["received"],
                "disks": [{"disk_id": d["disk_id"], "size": d["size"]} for d in idx["disks"]],
                "bytes_sent": idx["bytes_sent"], "locked_until": st["locked_until"],
                "verified_at": st["verified_at"], "damaged": st["damaged"] or [], "synced_from": st["synced_from"],
            })  # fmt: skip
    if not v.human:
        render(rows, HELD_COLS, v)
        return
    now = store.clock()
    t = Table("VM", "generation", "received", "disks", "sent", "locked until", "verified", "damaged", "from")
    for r in rows:
        lock = _when(r["locked_until"]) if (r["locked_until"] or 0) > now else "-"
        size = format_size(sum(d["size"] for d in r["disks"]))
        src = r["synced_from"] or {}
        t.add_row(
            r["vm"], str(r["generation"]), _when(r["received"]), size, format_size(r["bytes_sent"]), lock,
            _when(r["verified_at"]), str(len(r["damaged"])) if r["damaged"] else "-",
            src.get("url") or src.get("import") or "-",
        )  # fmt: skip
    out.print(t)


# -- timetable (kasou.vault.timetable) --------------------------------------------------------------


@timetable_app.command("set")
def timetable_set(
    url: str = typer.Option(None, "--from", help="Pull from this primary backup server (a second site)."),
    token: str = typer.Option(None, "--token", envvar="KASOU_BACKUP_SYNC_TOKEN", help="A reader token of it."),
    fingerprint: str = typer.Option(None, "--fingerprint", help="Its certificate's SHA-256 fingerprint."),
    sync_every: int = typer.Option(None, "--sync-every", help="Pull every N minutes (0: no scheduled sync)."),
    prune_at: str = typer.Option(None, "--prune-at", help="Prune and gc daily at HH:MM ('' : not)."),
    verify_at: str = typer.Option(None, "--verify-at", help="Verify daily at HH:MM ('' : not)."),
    verify_days: int = typer.Option(None, "--verify-days", help="Verify what was not verified within N days."),
    directory: Path = DirOpt,
) -> None:
    """Set what ``serve`` runs by itself (changes take effect within a minute, no restart)."""
    from dataclasses import replace

    from kasou.vault import timetable as vt

    store = _store(directory)
    t = vt.load(store)
    changes: dict[str, Any] = {}
    if url is not None:
        changes.update(sync_from=url or None, sync_fingerprint=fingerprint)
    if token is not None:
        changes["sync_token"] = token or None
    if sync_every is not None:
        changes["sync_every_min"] = sync_every or None
    for name, value in (("prune_at", prune_at), ("verify_at", verify_at)):
        if value is not None:
            changes[name] = value.strip() or None
    if verify_days is not None:
        changes["verify_days"] = verify_days
    t = replace(t, **changes).check()
    if t.sync_every_min and t.sync_from:
        from kasou.vault.sync import Primary

        Primary(t.sync_from, str(t.sync_token), t.sync_fingerprint).close()  # a URL or pin that cannot work: now
    vt.save(store, t)
    _say_timetable(t.public())


@timetable_app.command("show")
def timetable_show(
    directory: Path = DirOpt, output: str = OUTPUT, column: list[str] = COLUMN,
    as_json: bool = JSON,
) -> None:  # fmt: skip
    """The timetable and how each task went last (-c: any of its settings, or last)."""
    from dataclasses import asdict

    from kasou.vault import timetable as vt

    store = _store(directory)
    data = {**vt.load(store).public(), "last": asdict(vt.load_state(store))["results"]}
    v = view(output, column, as_json, cols(*data))
    if not v.human:
        render_one(data, cols(*data), v)
        return
    _say_timetable(data)
    for task, r in sorted(data["last"].items()):
        say(f"last {task}: {_when(r['at'])}, {'ok' if r['ok'] else 'FAILED'}: {r['summary']}")


def _say_timetable(t: dict[str, Any]) -> None:
    sync = f"every {t['sync_every_min']} min from {t['sync_from']}" if t.get("sync_every_min") else "not scheduled"
    say(f"sync: {sync}; prune and gc: {t.get('prune_at') or 'not scheduled'}; verify: "
        f"{t.get('verify_at') or 'not scheduled'} (not verified within {t['verify_days']} days)")  # fmt: skip
