"""The ``kasou`` command line. VM commands are clients of the REST API.

Errors print one line (``error: ...``) on stderr and exit with a status that says what went wrong (0 ok,
1 error, 2 usage, 3 not found, 4 conflict, 5 timeout); every command that prints data takes
``-o table|json|yaml|value`` and ``-c COLUMN``; actions wait with a progress bar unless ``--no-wait``
(:mod:`kasou.cli.output`, docs/cli.md).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import typer

from kasou import __version__
from kasou.cli import completion, manpages
from kasou.cli.common import (
    client,
    err,
    fail,
    follow,
    out,
    progress_bar,
    say,
    uptime_text,
)
from kasou.cli.host_shutdown import end_guests, shutdown_guests
from kasou.cli.output import (
    EPILOG,
    JOB_COLS,
    JOB_COLUMN,
    JSON,
    OUTPUT,
    WAIT,
    Col,
    KasouGroup,
    View,
    act,
    columns,
    dump,
    exit_code,
    render,
    render_one,
    view,
)
from kasou.config import Paths, check_settings
from kasou.errors import KasouError

# The command groups, loaded when a command line names them (KasouGroup), in the order kasou --help lists them;
# "" marks a group defined here.
KasouGroup.LAZY = {
    "vm": "kasou.cli.vms:vm_app",
    "network": "kasou.cli.networks:network_app",
    "host": "",
    "image": "kasou.cli.images:image_app",
    "job": "",
    "api": "",
    "lab": "kasou.cli.lab:lab_app",
    "event": "kasou.cli.events:event_app",
    "notify": "kasou.cli.notify:notify_app",
    "backup": "kasou.cli.backup:backup_app",
    "backup-server": "kasou.cli.backup_server:backup_server_app",
    "pool": "kasou.cli.storage:pool_app",
    "pool-desktop": "kasou.cli.desktops:desktop_pool_app",
    "disk": "kasou.cli.devices:disk_app",  # kasou.cli.storage's, with kasou.cli.devices' add, remove, resize
    "nic": "kasou.cli.devices:nic_app",
    "user": "kasou.cli.users:user_app",
    "directory": "kasou.cli.directory:directory_app",
    "maintenance-window": "kasou.cli.maintenance:window_app",
    "audit": "kasou.cli.audit:audit_app",
    "console": "kasou.cli.recordings:console_app",
    "snapshot": "kasou.cli.snapshot:snapshot_app",
    "plan": "kasou.cli.plan:plan_app",
    "tls": "kasou.cli.tls:tls_app",
    "config": "kasou.cli.config:config_app",
    "cluster": "kasou.cli.cluster:cluster_app",  # kasou cluster alone: the cluster's view; balance too
    "report": "",
}

app = typer.Typer(
    name="kasou",
    help="kasou (仮想): virtualization for hospital information systems.",
    epilog=EPILOG,
    cls=KasouGroup,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
host_app = typer.Typer(help="Virtual hosts.", no_args_is_help=True)
job_app = typer.Typer(help="Jobs (long operations).", no_args_is_help=True)
api_app = typer.Typer(help="The REST API.", no_args_is_help=True)
app.add_typer(host_app, name="host")
app.add_typer(job_app, name="job")
app.add_typer(api_app, name="api")

# -- services -------------------------------------------------------------------------


@app.command()
def up() -> None:
    """Start the single-host services (host agent, API) in the background: the one-host demo (a host
    installed from the Debian package runs them as systemd units: systemctl start kasou-agent kasou-api)."""
    from kasou import services

    result = services.up(Paths.from_env())
    for svc, what in result.items():
        out.print(f"{svc}: {what}", markup=False, highlight=False)


@app.command()
def down(
    vms: bool = typer.Option(False, "--vms", help="Shut the running VMs down too (gracefully)."),
) -> None:
    """Stop the single-host services. Running VMs keep running unless --vms is given."""
    from kasou import services

    paths = Paths.from_env()
    if vms and services.service_pid(paths, "api") is not None:
        # as at a host's shutdown: one bulk job, the reverse of the start-up order, each VM gracefully
        end_guests({}, 180)  # every VM of the single host
    for svc, what in services.down(paths).items():
        out.print(f"{svc}: {what}", markup=False, highlight=False)


@app.command()
def status() -> None:
    """Show whether the single-host services run."""
    from kasou import services

    for svc, pid in services.status(Paths.from_env()).items():
        out.print(f"{svc}: " + (f"running (pid {pid})" if pid else "not running"), markup=False)


@app.command(hidden=True)
def agent(
    listen: str = typer.Option(None, help="unix:PATH or HOST:PORT (default: the home's socket)"),
) -> None:
    """Run this host's agent in the foreground."""
    from kasou.agent.server import run_agent

    check_settings()  # a bad KASOU_* value: one line now, not a traceback from a running service
    run_agent(Paths.from_env(), listen)


@app.command("agent-guard", hidden=True)
def agent_guard() -> None:
    """Run this host's guard (cluster lease, self-fencing); the agent starts it."""
    from kasou.agent.server import run_guard

    check_settings()  # a bad KASOU_* value: one line now, not a traceback from a running service
    run_guard(Paths.from_env())


@app.command(hidden=True)
def serve(
    address: str = typer.Option(None, help="HOST:PORT for the API (default: KASOU_API)"),
    plain_http: bool = typer.Option(False, "--plain-http", help="Plain HTTP, on 127.0.0.1 only (default: HTTPS)."),
) -> None:
    """Run the control plane and REST API in the foreground."""
    from kasou.api.server import run_api

    check_settings()  # a bad KASOU_* value: one line now, not a traceback from a running service
    run_api(Paths.from_env(), address, plain_http)


@app.command()
def version() -> None:
    """Print kasou's version."""
    out.print(__version__)


# -- host -----------------------------------------------------------------------------


CHECK_COLS = [Col(k) for k in ("accelerator", "reason", "kvm_device", "kvm_probe_seconds", "qemu_version", "cpus",
                                "memory_total_mib", "memory_free_mib")]  # fmt: skip


@host_app.command("check")
def host_check(
    refresh: bool = typer.Option(False, "--refresh", help="Probe KVM again instead of using this boot's answer."),
    output: str = OUTPUT, column: list[str] = columns(CHECK_COLS), as_json: bool = JSON,
) -> None:  # fmt: skip
    """The accelerator this host will use and why, the QEMU version, CPUs and free memory."""
    import asyncio

    from kasou.agent.hostinfo import cpu_count, memory_mib
    from kasou.hypervisor.qemu import accel

    v = view(output, column, as_json, CHECK_COLS)
    paths = Paths.from_env()
    with progress_bar("probing the accelerator", out if v.table else err) as update:
        update(0.1, "booting a probe guest under KVM")
        d = asyncio.run(accel.decide(paths.images, refresh=refresh))
    total, avail = memory_mib()
    data = {
        "accelerator": d.accelerator,
        "reason": d.reason,
        "kvm_device": d.kvm_device,
        "kvm_probe_seconds": d.probe_seconds,
        "qemu_version": d.qemu_version,
        "cpus": cpu_count(),
        "memory_total_mib": total,
        "memory_free_mib": avail,
    }

    def human() -> None:
        for k, x in data.items():
            say(f"{k:18} {x}")

    render_one(data, CHECK_COLS, v, human=human)


def _mib(key: str) -> Callable[[dict[str, Any]], str]:
    return lambda r: f"{r[key]} MiB"


HOST_COLS = [
    Col("name"), Col("state"), Col("cpus", "CPUs"), Col("vcpus_used", "vCPUs used"),
    Col("memory_capacity_mib", "memory for VMs", _mib("memory_capacity_mib")),
    Col("memory_used_mib", "used", _mib("memory_used_mib")), Col("memory_free_mib", "free", _mib("memory_free_mib")),
    Col("vms_running", "VMs"), Col("load_1m", "load"),
]  # fmt: skip


@host_app.command("list")
def host_list(output: str = OUTPUT, column: list[str] = columns(HOST_COLS), as_json: bool = JSON) -> None:
    """The hosts of this environment: state, capacity and load."""
    v = view(output, column, as_json, HOST_COLS)
    render(client().get("/v1/hosts"), HOST_COLS, v)


host_app.command("shutdown-guests")(shutdown_guests)


@host_app.command("maintenance")
def host_maintenance(
    name: str,
    off: bool = typer.Option(False, "--off", help="Return the host to service."),
    wait: bool = WAIT,
    output: str = OUTPUT,
    column: list[str] = JOB_COLUMN,
    as_json: bool = JSON,
) -> None:
    """Empty a host by live-migrating its VMs elsewhere, and place nothing there (--off returns it)."""
    v = view(output, column, as_json, JOB_COLS)
    c = client()
    res = c.post(f"/v1/hosts/{name}/maintenance", params={"on": not off})
    if off or not res["job"]:
        if v.human:
            say(f"host {name}: back in service" if off else f"host {name}: in maintenance")
        else:
            render_one({"host": name, "maintenance": not off}, [Col("host"), Col("maintenance")], View(v.format))
        return
    job = act(c, res["job"], f"emptying {name}", v, wait, timeout=3600,
              queued=lambda j: f"host {name}: entering maintenance (job {j['id']})")  # fmt: skip
    if job is not None and v.human:
        result = job.get("result") or {}
        moved = result.get("moved", [])
        retried = result.get("retried") or {}
        again = f" ({len(retried)} after more than one attempt)" if retried else ""
        out.print(f"host {name}: in maintenance, {len(moved)} VMs moved{again}", markup=False, highlight=False)
        for w in result.get("warnings") or []:
            err.print(f"warning: {w}", markup=False, highlight=False, soft_wrap=True)


# -- reports -------------------------------------------------------------------------

report_app = typer.Typer(help="Reports.", no_args_is_help=True)
app.add_typer(report_app, name="report")


UPTIME_COLS = [Col("name"), Col("running"), Col("uptime_s", "uptime", lambda r: uptime_text(r["uptime_s"])),
               Col("stops"), Col("crashes"), Col("migrations")]  # fmt: skip


@report_app.command("uptime")
def report_uptime(output: str = OUTPUT, column: list[str] = columns(UPTIME_COLS), as_json: bool = JSON) -> None:
    """Per VM: time since its last real stop, and how often it stopped (a migration is not a stop)."""
    v = view(output, column, as_json, UPTIME_COLS)
    render(client().get("/v1/reports/uptime"), UPTIME_COLS, v)


# -- jobs and the API -----------------------------------------------------------------


@job_app.command("show")
def job_show(
    job_id: str, output: str = typer.Option("json", "-o", "--output", metavar="FORMAT",
                                            help="json (the default here), yaml, value or table."),
    column: list[str] = JOB_COLUMN, as_json: bool = JSON,
) -> None:  # fmt: skip
    """One job (as JSON unless -o says otherwise)."""
    v = view(output, column, as_json, JOB_COLS)
    render_one(client().get(f"/v1/jobs/{job_id}"), JOB_COLS, v)


@job_app.command("wait")
def job_wait(
    job_id: str,
    timeout: float = typer.Option(900, "--timeout", help="Seconds to wait (then exit 5)."),
    output: str = OUTPUT, column: list[str] = JOB_COLUMN, as_json: bool = JSON,
) -> None:  # fmt: skip
    """Wait for a job (one started with --no-wait) to end; exit with its outcome's code."""
    v = view(output, column, as_json, JOB_COLS)
    c = client()
    job = act(c, c.get(f"/v1/jobs/{job_id}"), f"job {job_id}", v, timeout=timeout)
    if job is not None and v.human:
        say(f"job {job_id}: {job['state']}")


@job_app.command("cancel")
def job_cancel(job_id: str, output: str = OUTPUT, column: list[str] = JOB_COLUMN, as_json: bool = JSON) -> None:
    """Cancel a running job (a cancelled migration leaves the VM running where it was)."""
    v = view(output, column, as_json, JOB_COLS)
    j = client().post(f"/v1/jobs/{job_id}/cancel")
    render_one(j, JOB_COLS, v, human=lambda: say(f"job {job_id}: {j['state']}"))


@job_app.command("list")
def job_list(
    vm: str = typer.Option(None, "--vm"), output: str = OUTPUT, column: list[str] = JOB_COLUMN, as_json: bool = JSON
) -> None:
    """Recent jobs."""
    v = view(output, column, as_json, JOB_COLS)
    jobs = client().get("/v1/jobs", params={"vm": vm} if vm else {})

    def human() -> None:
        for j in jobs:
            error = (j.get("error") or {}).get("message", "")
            out.print(f"{j['id']}  {j['kind']:9} {j['vm'] or '-':16} {j['state']:9} {error}", markup=False)

    render(jobs, JOB_COLS, v, human=human)


@api_app.command("openapi")
def api_openapi() -> None:
    """Print the API's OpenAPI document (the checked-in copy is src/kasou/api/openapi.json)."""
    from kasou.api.spec import openapi_document

    dump(openapi_document(), "json")


@app.command()
def demo(
    name: str = typer.Option("sample", help="Name of the sample VM."),
    timeout: float = typer.Option(120, help="Seconds to wait for the guest to be ready."),
) -> None:
    """The main job on one host: start kasou, build the tiny image, boot a sample VM."""
    from kasou import services
    from kasou.image import build_image

    paths = Paths.from_env()
    for svc, what in services.up(paths).items():
        out.print(f"{svc}: {what}", markup=False, highlight=False)
    with progress_bar("building image tiny") as update:
        build_image(paths.images, "tiny", progress=lambda s, f: update(f, s))
    c = client()
    existing = {v["name"]: v for v in c.get("/v1/vms")}
    if name not in existing:
        res = c.post("/v1/vms", json={"name": name, "image": "tiny", "vcpus": 1, "memory_mib": 128, "start": True})
        follow(c, res["job"], f"creating {name}")
    elif existing[name]["state"] in ("stopped", "crashed"):
        follow(c, c.post(f"/v1/vms/{name}/actions/start")["job"], f"starting {name}")
    deadline = time.monotonic() + timeout
    with progress_bar(f"waiting for {name} to boot") as update:
        while True:
            v = c.get(f"/v1/vms/{name}")
            if v["guest_ready"]:
                break
            if time.monotonic() > deadline:
                fail(f"VM {name} did not report ready within {timeout:.0f} s; see: kasou vm log {name}")
            update(min(0.95, 1 - (deadline - time.monotonic()) / timeout), v["state"])
            time.sleep(0.2)
    out.print(
        f"vm {name}: running on {v['host']}, guest ready, uptime {v['uptime_s']} s "
        f"({v['accelerator']}); try: kasou vm list, kasou vm log {name}",
        markup=False,
        highlight=False,
    )


@app.command("completion")
def completion_script(shell: str = typer.Argument(..., help="bash or zsh.")) -> None:
    """Print the shell completion script: source <(kasou completion bash); names come from the API."""
    if shell not in completion.SHELLS:
        fail(f"no completion for the shell {shell!r}: {' or '.join(completion.SHELLS)}", code=2)
    typer.echo(completion.script(shell))


@app.command("man")
def man_pages(out_dir: Path = typer.Option(..., "--out", help="Directory to write the pages into (man1).")) -> None:
    """Write the manual pages of every command (kasou.1, kasou-vm-start.1, ...), made from this command line."""
    try:
        n = manpages.write(app, out_dir)
    except OSError as e:
        fail(f"cannot write the manual pages into {out_dir}: {e.strerror or e}")
    out.print(f"{n} manual pages written to {out_dir}", markup=False, highlight=False)


def main() -> None:
    try:
        if completion.wanted():
            completion.complete(app)
            return
        app()
    except KasouError as e:  # raised outside a command (KasouGroup handles those inside)
        err.print(f"error: {e.message}", markup=False, highlight=False, soft_wrap=True)
        sys.exit(exit_code(e))
    except KeyboardInterrupt:
        err.print("error: interrupted", markup=False, highlight=False)
        sys.exit(130)


if __name__ == "__main__":
    main()
