"""``kasou backup key`` (the site's backup key pair, made here) and ``kasou backup server`` (where copies go).

The key pair is made on the machine this command runs on (an administrator's, not a hypervisor): the
private part is written to a file of mode 0600 and printed once as a paper key, to be kept offline; only the
public part is given to kasou (``backup server set --public-key``). See docs/backup-server.md.
"""

from __future__ import annotations

import json
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import typer

from kasou.cli.common import client, err, fail, follow, out, progress_bar, say
from kasou.cli.output import JSON, OUTPUT, Col, View, cols, columns, render, render_one, view
from kasou.errors import KasouError
from kasou.model.units import format_size
from kasou.vault.crypt import BackupKey, PublicBackupKey

KEY_OPT = typer.Option(None, "--key", help="The backup key's file (its private part: backup key create --out).")
PAPER_OPT = typer.Option(False, "--paper-key", help="Type the backup key from its paper copy instead.")
VMS_OPT = typer.Option(None, "--vms", help="Only these VMs (a,b,c); default: every VM the backup server holds.")
BEFORE_OPT = typer.Option(None, "--before", help="Newest generations received before this time (YYYY-MM-DD HH:MM).")

key_app = typer.Typer(help="The site's backup key: encrypts every copy on the backup server.", no_args_is_help=True)
server_app = typer.Typer(help="The backup server every new generation is copied to.", no_args_is_help=True)


def load_key(path: str | None, paper: bool) -> BackupKey:
    """The private backup key from a key file, or (``paper``) typed or piped in from its paper copy."""
    try:
        if paper:
            if sys.stdin.isatty():
                out.print("type the paper key (KASOU-BK1-...), then Enter:")
            return BackupKey.from_paper(sys.stdin.readline())
        if path is None:
            fail("give the backup key: --key FILE, or --paper-key to type it from its paper copy")
        return BackupKey.load(path)
    except KasouError as e:
        fail(e.message)
    except OSError as e:
        fail(f"cannot read the backup key {path}: {e.strerror}")
    raise AssertionError("unreachable")


@key_app.command("create")
def key_create(
    out_file: Path = typer.Option(..., "--out", help="The private key's file (made with mode 0600; must not exist)."),
    public_out: Path = typer.Option(None, "--public-out", help="Also write the public part here (default: OUT.pub)."),
) -> None:
    """Make the site's backup key pair; print the private key once as a paper key to keep offline."""
    pub_file = public_out or out_file.with_name(out_file.name + ".pub")
    for p in (out_file, pub_file):
        if p.exists():
            fail(f"{p} exists: a backup key is never overwritten (the backups encrypted to it need it)")
    key = BackupKey.generate()
    try:
        key.save(out_file)
        key.public().save(pub_file)
    except (OSError, KasouError) as e:
        out_file.unlink(missing_ok=True)
        fail(f"cannot write the backup key: {getattr(e, 'message', None) or e}")
    say(f"backup key {key.fingerprint}: private part in {out_file} (mode 0600), public part in {pub_file}")
    say("Write this paper key down and keep it offline, away from every server; restores need it:")
    out.print(key.paper(), markup=False, highlight=False)
    say(f"then: kasou backup server set --url URL --token T --fingerprint F --public-key {pub_file}")


@key_app.command("export")
def key_export(
    key_file: str = typer.Option(..., "--key", help="The private key's file."),
    paper: bool = typer.Option(False, "--paper", help="Print its paper copy (else its public part, as JSON)."),
) -> None:
    """Print a backup key's paper copy, or its public part."""
    key = load_key(key_file, False)
    if paper:
        out.print(key.paper(), markup=False, highlight=False)
    else:
        out.print(key.public().to_json(), markup=False, highlight=False)


@server_app.command("set")
def server_set(
    url: str = typer.Option(..., "--url", help="The backup server, e.g. https://backup1.hospital.local:8472"),
    token: str = typer.Option(None, "--token", help="A writer token it issued (or --token-stdin)."),
    token_stdin: bool = typer.Option(False, "--token-stdin", help="Read the token from standard input."),
    fingerprint: str = typer.Option(None, "--fingerprint", help="Its certificate's SHA-256 (backup-server show)."),
    public_key: Path = typer.Option(..., "--public-key", help="The site's backup public key (backup key create)."),
) -> None:
    """Copy every new backup generation to this backup server (checked before it is kept)."""
    if token_stdin:
        token = sys.stdin.readline().strip()
    if not token:
        fail("give the backup server's writer token: --token T or --token-stdin")
    try:
        pub = PublicBackupKey.load(public_key)
    except KasouError as e:
        fail(e.message)
    except OSError as e:
        fail(f"cannot read the public key {public_key}: {e.strerror}")
    body = {"url": url, "token": token, "fingerprint": fingerprint, "public_key": json.loads(pub.to_json())}
    v = client().put("/v1/backup-server", json=body)
    if v.get("role") == "reader":
        say(f"{v['url']} (server {v['server_id']}) is set with a reader token: restores and drills read it; no "
            "backup is copied there (a writer token copies them)")  # fmt: skip
        return
    say(f"backups are copied to {v['url']} (server {v['server_id']}), encrypted to key {v['key_fingerprint']}")


SERVER_COLS = cols("url", "server_id", "fingerprint", "key_fingerprint", "role", hidden=("isolated",))


@server_app.command("show")
def server_show(output: str = OUTPUT, column: list[str] = columns(SERVER_COLS), as_json: bool = JSON) -> None:
    """The backup server new generations are copied to."""
    view_ = view(output, column, as_json, SERVER_COLS)
    v = client().get("/v1/backup-server")
    if not view_.human:
        render_one(v or {}, SERVER_COLS, view_, data=v)
    elif v is None:
        say("no backup server is set: generations stay on their hosts only")
    else:
        role = "; a reader token: restores only" if v.get("role") == "reader" else ""
        say(f"{v['url']} (server {v['server_id']}, certificate {v['fingerprint'] or '-'}); key {v['key_fingerprint']}"
            f"{role}")  # fmt: skip


@server_app.command("isolate")
def server_isolate(rejoin: bool = typer.Option(False, "--rejoin", help="Let the hosts reach it again.")) -> None:
    """Cut every host off from the backup server at once (copies and restores wait); the backup server's own
    ``kasou backup-server isolate`` is the cut an attacker holding kasou cannot undo."""
    v = client().post("/v1/backup-server/isolate", json={"rejoin": rejoin})
    if v["isolated"]:
        say(f"the hosts are cut off from {v['url']}; on the backup server, also run: kasou backup-server isolate")
    else:
        say(f"the hosts reach {v['url']} again")


@server_app.command("unset")
def server_unset() -> None:
    """Stop copying new generations to the backup server (what it holds stays there)."""
    removed = client().delete("/v1/backup-server").get("removed")
    say("no backup server is set any more" if removed else "no backup server was set")


def parse_time(value: str) -> float:
    """``YYYY-MM-DD HH:MM[:SS]`` (this machine's local time) or seconds since the epoch."""
    v = value.strip()
    try:
        return float(v)
    except ValueError:
        pass
    for fmt in ("%Y-%m-%d %H:%M:%S", "%Y-%m-%d %H:%M", "%Y-%m-%dT%H:%M:%S", "%Y-%m-%dT%H:%M"):
        try:
            return time.mktime(time.strptime(v, fmt))
        except ValueError:
            continue
    fail(f"--before {value!r}: give a time as YYYY-MM-DD HH:MM (local time) or seconds since the epoch")
    raise AssertionError("unreachable")


PLAN_COLS = [
    Col("order"), Col("vm"), Col("generation"), Col("created", "taken", lambda p: _when(p["created"])),
    Col("priority"), Col("memory_mib", "memory", lambda p: f"{p['memory_mib']} MiB"),
    Col("bytes_logical", "disks", lambda p: format_size(p["bytes_logical"])), *cols(hidden=("host", "seconds")),
]  # fmt: skip
DRILL_COLS = [
    Col("vm"), Col("generation"), Col("created", "taken", lambda r: _when(r["created"])),
    Col("ok", "result", lambda r: "passed" if r["ok"] else "FAILED"),
    Col("restore_s", "restore", lambda r: _seconds(r.get("restore_s"))),
    Col("boot_s", "boot", lambda r: _seconds(r.get("boot_s"))),
    Col("check", text=lambda r: "-" if r.get("check") is None else f"exit {r['check']['exitcode']}"),
    Col("error", "why", lambda r: r.get("error") or ""),
]  # fmt: skip


def _seconds(v: float | None) -> str:
    return "-" if v is None else f"{v} s"


def restore_all(key: str | None, paper_key: bool, before: str | None, vms: str | None, start: bool,
                dry_run: bool, v: View, parallel: int = 1) -> None:  # fmt: skip
    """Bring every VM the backup server holds back, highest HA priority first (see ``backup restore-all``):
    at most ``parallel`` at once, each started in the plan's order."""
    if not 1 <= parallel <= 16:
        fail(f"--parallel takes 1 to 16, not {parallel}")
    k = json.loads(load_key(key, paper_key).to_json())
    body: dict[str, Any] = {"key": k}
    if before is not None:
        body["before"] = parse_time(before)
    if vms:
        body["vms"] = [v.strip() for v in vms.split(",") if v.strip()]
    c = client()
    plan = c.post("/v1/backup-server/restore-plan", json=body)
    rows = [{"order": i, **p} for i, p in enumerate(plan, 1)]
    if dry_run:
        render(rows, PLAN_COLS, v, data=plan)
        return
    if v.human:
        render(rows, PLAN_COLS, v)
    t0 = time.monotonic()
    done = _restore_each(c, plan, k, start, parallel, v)
    total = round(time.monotonic() - t0, 1)
    if v.human:
        say(f"{len(done)} VMs restored from the backup server in {total} s")
    else:
        by = {p["vm"]: p for p in rows}
        render([{**by.get(d["vm"], {}), **d} for d in done], PLAN_COLS, v,
               data={"restored": done, "seconds": total, "parallel": parallel})  # fmt: skip


def _restore_each(c: Any, plan: list[dict[str, Any]], k: dict[str, Any], start: bool, parallel: int,
                  v: View) -> list[dict[str, Any]]:  # fmt: skip
    """Each VM's restore (and start) job, submitted in the plan's order, at most ``parallel`` running; a
    failure submits nothing more, lets the running ones end, and fails with the first failure's reason."""
    todo = list(enumerate(plan, 1))
    running: dict[str, dict[str, Any]] = {}  # job id -> {i, p, t1, phase, host}
    done: list[dict[str, Any]] = []
    failed: list[str] = []
    with progress_bar(f"restoring {len(plan)} VMs, {parallel} at a time", out if v.table else err) as update:
        while todo or running:
            while todo and not failed and len(running) < parallel:
                i, p = todo.pop(0)
                try:
                    res = c.post(f"/v1/vms/{p['vm']}/backups/{p['generation']}/restore",
                                 json={"as": p["vm"], "from_server": True, "key": k})  # fmt: skip
                except KasouError as e:  # refused before anything was made (a name not free, ...)
                    failed.append(f"{p['vm']}: {e.message}")
                    break
                running[res["job"]["id"]] = {"i": i, "p": p, "t1": time.monotonic(), "phase": "restore",
                                             "host": res["vm"]["host"]}  # fmt: skip
            if failed and not running:
                break
            time.sleep(0.2)
            for job_id, r in list(running.items()):
                job = c.get(f"/v1/jobs/{job_id}")
                if job["state"] in ("queued", "running"):
                    continue
                del running[job_id]
                p = r["p"]
                if job["state"] != "succeeded":
                    why = (job.get("error") or {}).get("message") or f"job {job_id} {job['state']}"
                    failed.append(f"{p['vm']}: {r['phase']} failed: {why}")
                    continue
                if start and r["phase"] == "restore":
                    running[c.post(f"/v1/vms/{p['vm']}/actions/start")["job"]["id"]] = {**r, "phase": "start"}
                    continue
                row = {"vm": p["vm"], "generation": p["generation"], "host": r["host"],
                       "seconds": round(time.monotonic() - r["t1"], 1)}  # fmt: skip
                done.append(row)
                update(len(done) / max(1, len(plan)), p["vm"])
                if v.human:
                    say(f"vm {p['vm']}: restored from generation {p['generation']} on {row['host']}"
                        f"{' and started' if start else ' (stopped)'} in {row['seconds']} s ({len(done)} of "
                        f"{len(plan)}, priority order {r['i']})")  # fmt: skip
    if failed:
        fail(f"{failed[0]} ({len(done)} of {len(plan)} VMs restored; nothing more was started)")
    return done


def _when(t: float | None) -> str:
    return "-" if t is None else time.strftime("%Y-%m-%d %H:%M", time.localtime(t))


def drill(key: str | None, paper_key: bool, vms: str | None, before: str | None, network: str,
          checks: list[str], timeout: float, v: View) -> None:  # fmt: skip
    """Run a restore drill and print each VM's result (see ``backup drill``); exit 1 if any failed."""
    body: dict[str, Any] = {"key": json.loads(load_key(key, paper_key).to_json()), "network": network,
                            "timeout_s": timeout, "check": {}}  # fmt: skip
    if before is not None:
        body["before"] = parse_time(before)
    if vms:
        body["vms"] = [v.strip() for v in vms.split(",") if v.strip()]
    for c in checks:
        vm, sep, command = c.partition("=")
        if not sep or not vm.strip() or not command.strip():
            fail(f"--check {c!r}: give VM=COMMAND, e.g. emr-db='/usr/bin/psql -U postgres -c \"select 1\"'")
        body["check"][vm.strip()] = shlex.split(command)
    c_ = client()
    res = c_.post("/v1/backup-server/drill", json=body)
    job = follow(c_, res["job"], "restore drill", timeout=86_400, console=out if v.table else err)
    results = (job.get("result") or {}).get("drills", [])
    render(results, DRILL_COLS, v, data=job.get("result"))
    if job.get("state") != "succeeded":
        fail(f"the drill did not run to its end: {(job.get('error') or {}).get('message', job.get('state'))}")
    failed = [r["vm"] for r in results if not r["ok"]]
    if failed:
        fail(f"restore drill failed for {', '.join(failed)}")
