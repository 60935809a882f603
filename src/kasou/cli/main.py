"""The ``kasou`` command line. VM commands are clients of the REST API.

Errors print one line (``error: ...``) on stderr and exit with status 1.
Long operations show a progress bar on a terminal.
"""

from __future__ import annotations

import asyncio
import sys
import time
from typing import Any

import typer
from rich.table import Table

from kasou import __version__, services
from kasou.cli.audit import audit_app
from kasou.cli.backup import backup_app
from kasou.cli.common import (
    client,
    cloud_init_body,
    err,
    fail,
    follow,
    out,
    parse_int,
    print_json,
    progress_bar,
    seed_text,
    startup_body,
    startup_text,
)
from kasou.cli.console import follow_log
from kasou.cli.console import register as register_console
from kasou.cli.desktops import desktop_pool_app
from kasou.cli.devices import nic_app, say_sizes
from kasou.cli.events import event_app
from kasou.cli.images import image_app
from kasou.cli.lab import lab_app
from kasou.cli.media import cd_text, media_app
from kasou.cli.networks import network_app
from kasou.cli.plan import plan_app
from kasou.cli.snapshot import snapshot_app
from kasou.cli.storage import disk_app, pool_app
from kasou.cli.tls import tls_app
from kasou.cli.transfer import vm_export, vm_import
from kasou.cli.users import user_app
from kasou.config import Paths, check_settings
from kasou.errors import KasouError
from kasou.model.units import format_size

app = typer.Typer(
    name="kasou",
    help="kasou (仮想): virtualization for hospital information systems.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
vm_app = typer.Typer(help="Virtual machines.", no_args_is_help=True)
host_app = typer.Typer(help="Virtual hosts.", no_args_is_help=True)
job_app = typer.Typer(help="Jobs (long operations).", no_args_is_help=True)
api_app = typer.Typer(help="The REST API.", no_args_is_help=True)
app.add_typer(vm_app, name="vm")
vm_app.add_typer(media_app, name="media")
app.add_typer(network_app, name="network")
app.add_typer(host_app, name="host")
app.add_typer(image_app, name="image")
app.add_typer(job_app, name="job")
app.add_typer(api_app, name="api")
app.add_typer(lab_app, name="lab")
app.add_typer(event_app, name="event")
app.add_typer(backup_app, name="backup")
app.add_typer(pool_app, name="pool")
app.add_typer(desktop_pool_app, name="pool-desktop")
app.add_typer(disk_app, name="disk")  # with kasou.cli.devices' add, remove, resize
app.add_typer(nic_app, name="nic")
app.add_typer(user_app, name="user")
app.add_typer(audit_app, name="audit")
app.add_typer(snapshot_app, name="snapshot")
app.add_typer(plan_app, name="plan")
app.add_typer(tls_app, name="tls")

# -- services -------------------------------------------------------------------------


@app.command()
def up() -> None:
    """Start the single-host services (host agent, API) in the background."""
    result = services.up(Paths.from_env())
    for svc, what in result.items():
        out.print(f"{svc}: {what}", markup=False, highlight=False)


@app.command()
def down(
    vms: bool = typer.Option(False, "--vms", help="Shut the running VMs down too (gracefully)."),
) -> None:
    """Stop the single-host services. Running VMs keep running unless --vms is given."""
    paths = Paths.from_env()
    if vms and services.service_pid(paths, "api") is not None:
        c = client()
        jobs = []
        for vm in c.get("/v1/vms"):
            if vm["state"] in ("running", "paused"):
                action = "shutdown" if vm["state"] == "running" else "stop"
                jobs.append((vm["name"], c.post(f"/v1/vms/{vm['name']}/actions/{action}")["job"]))
        for name, job in jobs:
            c.wait_job(job["id"], 180)
            out.print(f"vm {name}: stopped", markup=False, highlight=False)
    for svc, what in services.down(paths).items():
        out.print(f"{svc}: {what}", markup=False, highlight=False)


@app.command()
def status() -> None:
    """Show whether the single-host services run."""
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
def cluster(as_json: bool = typer.Option(False, "--json")) -> None:
    """The virtual environment: the hosts that are up and whose control plane leads."""
    c = client().get("/v1/cluster")
    if as_json:
        print_json(c)
        return
    kind = "cluster (etcd)" if c["clustered"] else "single host (SQLite)"
    out.print(f"{kind}; leader: {c['leader'] or '-'}; hosts up: {', '.join(c['hosts'])}", markup=False)


@app.command()
def version() -> None:
    """Print kasou's version."""
    out.print(__version__)


# -- host -----------------------------------------------------------------------------


@host_app.command("check")
def host_check(
    as_json: bool = typer.Option(False, "--json"),
    refresh: bool = typer.Option(False, "--refresh", help="Probe KVM again instead of using this boot's answer."),
) -> None:
    """The accelerator this host will use and why, the QEMU version, CPUs and free memory."""
    from kasou.agent.hostinfo import cpu_count, memory_mib
    from kasou.hypervisor.qemu import accel

    paths = Paths.from_env()
    with progress_bar("probing the accelerator") as update:
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
    if as_json:
        print_json(data)
        return
    for k, v in data.items():
        out.print(f"{k:18} {v}", markup=False, highlight=False)


@host_app.command("list")
def host_list(as_json: bool = typer.Option(False, "--json")) -> None:
    """The hosts of this environment: state, capacity and load."""
    hosts = client().get("/v1/hosts")
    if as_json:
        print_json(hosts)
        return
    t = Table("name", "state", "CPUs", "vCPUs used", "memory for VMs", "used", "free", "VMs", "load")
    for h in hosts:
        t.add_row(
            h["name"], h["state"], str(h["cpus"]), str(h["vcpus_used"]), f"{h['memory_capacity_mib']} MiB",
            f"{h['memory_used_mib']} MiB", f"{h['memory_free_mib']} MiB", str(h["vms_running"]), str(h["load_1m"]),
        )  # fmt: skip
    out.print(t)


@host_app.command("maintenance")
def host_maintenance(
    name: str,
    off: bool = typer.Option(False, "--off", help="Return the host to service."),
    wait: bool = typer.Option(True, "--wait/--no-wait"),
) -> None:
    """Empty a host by live-migrating its VMs elsewhere, and place nothing there (--off returns it)."""
    c = client()
    res = c.post(f"/v1/hosts/{name}/maintenance", params={"on": not off})
    if off:
        out.print(f"host {name}: back in service", markup=False, highlight=False)
        return
    if wait and res["job"]:
        job = follow(c, res["job"], f"emptying {name}", timeout=3600)
        result = job.get("result") or {}
        moved = result.get("moved", [])
        retried = result.get("retried") or {}
        again = f" ({len(retried)} after more than one attempt)" if retried else ""
        out.print(f"host {name}: in maintenance, {len(moved)} VMs moved{again}", markup=False, highlight=False)
        for w in result.get("warnings") or []:
            err.print(f"warning: {w}", markup=False, highlight=False, soft_wrap=True)
    else:
        out.print(f"host {name}: entering maintenance (job {res['job']['id']})", markup=False, highlight=False)


# -- VMs ------------------------------------------------------------------------------


@vm_app.command("create")
def vm_create(
    name: str,
    image: str = typer.Option(None, "--image", help="Guest image to copy (e.g. tiny)."),
    template: str = typer.Option(None, "--from", help="Template to make a linked clone of."),
    vcpus: str = typer.Option("1", "--vcpus"),
    memory: str = typer.Option("128", "--memory", help="Memory in MiB."),
    disk: list[str] = typer.Option(
        None, "--disk", help="Boot disk size, e.g. 1G (default: the image's); again for each empty data disk."
    ),
    start: bool = typer.Option(False, "--start", help="Start it once created."),
    description: str = typer.Option("", "--description"),
    department: str = typer.Option(
        None, "--department", help="Department whose vendor manages it (e.g. lab, pacs, pharmacy)."
    ),
    shared: bool = typer.Option(False, "--shared", help="Put the disk on the shared storage every host sees."),
    replicated: bool = typer.Option(
        False, "--replicated", help="Keep a synchronous copy of the disk on another host (network RAID-1)."
    ),
    network: str = typer.Option("user", "--network", help="Network of its NIC (default: user, QEMU's NAT)."),
    anti_affinity: str = typer.Option(
        None, "--anti-affinity", help="Group whose VMs never run on one host (e.g. emr-db for the two EMR databases)."
    ),
    ha: bool = typer.Option(
        False,
        "--ha",
        help="High availability: restart it elsewhere if its host fails (in a cluster it needs "
        "--replicated or --shared); restart it if its QEMU dies, reset it if its guest hangs.",
    ),
    priority: str = typer.Option("50", "--priority", help="HA restart order, 0..100, highest first."),
    pool: str = typer.Option(None, "--pool", help="Storage pool of its disk (default: the built-in pool)."),
    mirror: str = typer.Option(
        None, "--mirror", help="RAID-1: POOL_A,POOL_B, a copy of the disk in each, every write in both."
    ),
    cpu: str = typer.Option(
        None,
        "--cpu",
        help="Virtual CPU model: x86-64-v2-AES (default, migration-safe), x86-64-v2, x86-64-v3, "
        "qemu64, host (KVM on every host only).",
    ),
    machine: str = typer.Option(
        None, "--machine", help="q35 machine type, e.g. pc-q35-7.2 (default: pinned to the host's QEMU)."
    ),
    firmware: str = typer.Option(
        None, "--firmware", help="bios (default), uefi, or uefi-secure (Secure Boot with Microsoft's keys); fixed."
    ),
    tpm: bool = typer.Option(None, "--tpm/--no-tpm", help="A TPM 2.0 (swtpm), its state kept with the VM."),
    os_type: str = typer.Option(
        None, "--os", help="linux, windows or other; windows: uefi-secure, a TPM, Hyper-V, clock in local time."
    ),
    cdrom: str = typer.Option(
        None, "--cdrom", help="An ISO image to install from (kasou image import); with no --image: a blank --disk."
    ),
    boot: str = typer.Option(None, "--boot", help="Boot order, e.g. cdrom,disk (default: disk, then cdrom)."),
    onboot: bool = typer.Option(None, "--onboot/--no-onboot", help="Start it when its host boots."),
    order: str = typer.Option(None, "--order", help="With --onboot: start order, 0..1000, lowest first."),
    delay: str = typer.Option(None, "--delay", help="With --onboot: seconds to wait before the next VM starts."),
    hostname: str = typer.Option(None, "--hostname", help="cloud-init: the guest's host name (default: its name)."),
    ssh_key: list[str] = typer.Option(None, "--ssh-key", help="cloud-init: a public key file (.pub) to log in with."),
    ip: str = typer.Option(None, "--ip", help="cloud-init: the first NIC's address, e.g. 10.20.0.15/24 (else DHCP)."),
    gateway: str = typer.Option(None, "--gateway", help="cloud-init: with --ip, the default gateway."),
    dns: list[str] = typer.Option(None, "--dns", help="cloud-init: with --ip, a DNS server (repeat)."),
    user_data: str = typer.Option(None, "--user-data", help="cloud-init: a user-data file (#cloud-config, ...)."),
    wait: bool = typer.Option(True, "--wait/--no-wait"),
) -> None:
    """Define a VM (thin qcow2 disk from an image, a linked clone of a template, or a blank disk and an ISO)."""
    body = {
        "name": name,
        "image": image,
        "template": template,
        "vcpus": parse_int(vcpus, "vcpus"),
        "memory_mib": parse_int(memory, "memory"),
        "disk": (disk[0] if len(disk) == 1 else disk) if disk else None,
        "start": start,
        "description": description,
        "department": department,
        "storage": "shared" if shared else ("replicated" if replicated else "local"),
        "network": network,
        "anti_affinity": anti_affinity,
        "ha": ha,
        "priority": parse_int(priority, "priority"),
        "pool": pool,
        "mirror": [p.strip() for p in mirror.split(",")] if mirror is not None else None,
        "cpu": cpu,
        "machine": machine,
        "firmware": firmware,
        "tpm": tpm,
        "os": os_type,
        "cdrom": cdrom,
        "boot": boot,
        "startup": startup_body(onboot, order, delay),
        "cloud_init": cloud_init_body(hostname, ssh_key, ip, gateway, dns, user_data),
    }
    c = client()
    res = c.post("/v1/vms", json=body)
    if wait:
        follow(c, res["job"], f"creating {name}")
    what = "created and started" if start else "created"
    out.print(f"vm {name}: {what} on {res['vm']['host']}", markup=False, highlight=False)


def _action(name: str, action: str, wait: bool, timeout: float | None = None) -> None:
    c = client()
    params = {} if timeout is None else {"timeout": timeout}
    res = c.post(f"/v1/vms/{name}/actions/{action}", params=params)
    if not wait:
        out.print(f"vm {name}: {action} job {res['job']['id']}", markup=False, highlight=False)
        return
    job = follow(c, res["job"], f"{action} {name}")
    result = job.get("result") or {}
    how = f" ({result['detail']})" if result.get("detail") else ""  # a shutdown says what ended the guest
    out.print(f"vm {name}: {result.get('state', 'done')}{how}", markup=False, highlight=False)


WAIT = typer.Option(True, "--wait/--no-wait", help="Wait for the operation to finish.")


@vm_app.command("start")
def vm_start(name: str, wait: bool = WAIT) -> None:
    """Start a VM."""
    _action(name, "start", wait)


@vm_app.command("shutdown")
def vm_shutdown(
    name: str,
    timeout: float = typer.Option(None, "--timeout", help="Seconds to wait before a hard stop (default 60)."),
    wait: bool = WAIT,
) -> None:
    """Shut a VM down gracefully (its guest agent if one answers, else the ACPI power button), then stop it
    hard after a timeout."""
    _action(name, "shutdown", wait, timeout)


@vm_app.command("stop")
def vm_stop(name: str, wait: bool = WAIT) -> None:
    """Stop a VM at once (like pulling the plug)."""
    _action(name, "stop", wait)


@vm_app.command("reboot")
def vm_reboot(name: str, wait: bool = WAIT) -> None:
    """Reset a VM (a hard reset of the virtual machine)."""
    _action(name, "reboot", wait)


@vm_app.command("pause")
def vm_pause(name: str, wait: bool = WAIT) -> None:
    """Pause a VM's vCPUs."""
    _action(name, "pause", wait)


@vm_app.command("resume")
def vm_resume(name: str, wait: bool = WAIT) -> None:
    """Resume a paused VM."""
    _action(name, "resume", wait)


@vm_app.command("delete")
def vm_delete(
    name: str,
    keep_disks: bool = typer.Option(False, "--keep-disks", help="Keep the disk files."),
    force: bool = typer.Option(False, "--force", help="Stop it first if it runs."),
    wait: bool = WAIT,
) -> None:
    """Delete a VM: its process, its disks (unless --keep-disks) and its record."""
    c = client()
    res = c.delete(f"/v1/vms/{name}", params={"keep_disks": keep_disks, "force": force})
    if wait:
        follow(c, res["job"], f"deleting {name}")
    out.print(f"vm {name}: deleted", markup=False, highlight=False)


@vm_app.command("migrate")
def vm_migrate(
    name: str,
    to: str = typer.Option(None, "--to", help="Destination host (default: the scheduler's choice)."),
    downtime_ms: str = typer.Option("100", "--downtime-ms", help="Longest pause the guest may see."),
    bandwidth: str = typer.Option(None, "--bandwidth", help="Cap the migration stream, MiB/s."),
    wait: bool = WAIT,
) -> None:
    """Live-migrate a running VM to another host (its disks too, unless they are on shared storage)."""
    c = client()
    body: dict[str, Any] = {"to": to, "downtime_ms": parse_int(downtime_ms, "downtime_ms")}
    if bandwidth is not None:
        body["bandwidth_mib_s"] = parse_int(bandwidth, "bandwidth")
    res = c.post(f"/v1/vms/{name}/migrate", json=body)
    if not wait:
        out.print(f"vm {name}: migrate job {res['job']['id']}", markup=False, highlight=False)
        return
    job = follow(c, res["job"], f"migrating {name}", timeout=1800)
    r = job.get("result") or {}
    out.print(
        f"vm {name}: migrated {r.get('from')} -> {r.get('to')} ({r.get('storage')} storage, "
        f"downtime {r.get('downtime_ms')} ms, total {r.get('total_ms')} ms)",
        markup=False,
        highlight=False,
    )
    for w in r.get("warnings") or []:  # e.g. its old copy could not be ended: an operator must act
        err.print(f"warning: {w}", markup=False, highlight=False, soft_wrap=True)


vm_app.command("import")(vm_import)  # kasou.cli.transfer
vm_app.command("export")(vm_export)


@vm_app.command("template")
def vm_template(name: str) -> None:
    """Freeze a stopped VM as a template for linked clones (kasou vm create --from NAME)."""
    client().post(f"/v1/vms/{name}/template")
    out.print(f"vm {name}: is now a template", markup=False, highlight=False)


def _uptime(s: float | None) -> str:
    if s is None:
        return "-"
    s = int(s)
    d, s = divmod(s, 86400)
    h, s = divmod(s, 3600)
    m, s = divmod(s, 60)
    return (f"{d}d " if d else "") + f"{h:02d}:{m:02d}:{s:02d}"


@vm_app.command("list")
def vm_list(as_json: bool = typer.Option(False, "--json")) -> None:
    """All VMs with their state, host and guest uptime."""
    vms = client().get("/v1/vms")
    if as_json:
        print_json(vms)
        return
    t = Table("name", "state", "host", "vCPU", "memory", "disk", "ready", "uptime")
    for v in vms:
        disk = format_size(v["disks"][0]["size_bytes"]) if v["disks"] else "-"
        state = v["state"] if v["host_reachable"] else f"{v['state']} (host unreachable)"
        t.add_row(
            v["name"], state, v["host"] or "-", str(v["vcpus"]), f"{v['memory_mib']} MiB", disk,
            "yes" if v["guest_ready"] else "no", _uptime(v["uptime_s"]),
        )  # fmt: skip
    out.print(t)


@vm_app.command("show")
def vm_show(name: str, as_json: bool = typer.Option(False, "--json")) -> None:
    """One VM in detail."""
    v = client().get(f"/v1/vms/{name}")
    if as_json:
        print_json(v)
        return
    rows = [
        ("name", v["name"]),
        ("uuid", v["uuid"]),
        ("department", v["department"] or "-"),
        ("state", v["state"] if v["host_reachable"] else f"{v['state']} (host {v['host']} unreachable)"),
        ("host", v["host"] or "-"),
        ("vcpus", v["vcpus"]),
        ("memory", f"{v['memory_mib']} MiB"),
        ("image", v["image"] or "-"),
        ("cpu", v.get("cpu") or "QEMU's default"),
        ("machine", v.get("machine") or "q35"),
        ("firmware", _firmware_text(v)),
        ("CD drive", cd_text(v)),
        ("template", v["template"] or "-"),
        ("HA", _ha_text(v)),
        ("start-up", startup_text(v)),
        ("cloud-init", seed_text(v)),
        ("anti-affinity", v["anti_affinity"] or "-"),
        (
            "storage",
            v["storage"] + (f" (replica on {v['replica']['host']}: {v['replica']['state']})" if v["replica"] else ""),
        ),
        ("guest ready", "yes" if v["guest_ready"] else "no"),
        ("guest uptime", _uptime(v["uptime_s"])),
        ("guest agent", _guest_text(v.get("guest") or {})),
        ("accelerator", v["accelerator"] or "-"),
    ]
    for d in v["disks"]:
        linked = f" (linked clone of {d['backing']})" if d["linked"] else ""
        rows.append((d["id"], f"{format_size(d['size_bytes'])} {d['format']} {d['path']}{linked} (pool {d['pool']})"))
        m = d.get("mirror")
        if m:
            where = m["path"] or f"lost: {m['failed'] or '-'}"
            why = f" - {m['error']}" if m.get("error") and m["state"] == "degraded" else ""
            rows.append((f"{d['id']} mirror", f"{m['state']}: pool {m['pool']}, {where}{why}"))
    for n in v["nics"]:
        vlan = f" (VLAN {n['vlan']})" if n.get("vlan") is not None else ""
        rows.append((n["id"], f"{n['mac']} on {n['network']}{vlan}"))
    if v["job"]:
        rows.append(("job", v["job"]))
    if v["last_error"]:
        rows.append(("last error", v["last_error"]))
    for k, val in rows:
        out.print(f"{k:13} {val}", markup=False, highlight=False)


def _guest_text(g: dict[str, Any]) -> str:
    """The guest agent's line of ``vm show``: answering, with what the guest says of itself, or not."""
    if not g.get("agent"):
        return "not answering" + (f" (last answered {g['agent_age_s']:.0f} s ago)" if g.get("agent_age_s") else "")
    said = [g.get("os"), g.get("hostname") and f"host name {g['hostname']}", ", ".join(g.get("ips") or [])]
    return "answering" + (f": {'; '.join(x for x in said if x)}" if any(said) else "")


@vm_app.command("set")
def vm_set(
    name: str,
    ha: str = typer.Option(
        None,
        "--ha",
        help="on or off: restart it elsewhere if its host fails (in a cluster: replicated or shared disks only).",
    ),
    priority: str = typer.Option(None, "--priority", help="HA restart order, 0..100, highest first."),
    description: str = typer.Option(None, "--description"),
    department: str = typer.Option(None, "--department", help="Department whose vendor manages it ('' removes it)."),
    onboot: bool = typer.Option(None, "--onboot/--no-onboot", help="Start it when its host boots."),
    order: str = typer.Option(None, "--order", help="With --onboot: start order, 0..1000, lowest first."),
    delay: str = typer.Option(None, "--delay", help="With --onboot: seconds to wait before the next VM starts."),
    vcpus: str = typer.Option(None, "--vcpus", help="vCPUs (applied at its next start)."),
    memory: str = typer.Option(None, "--memory", help="Memory in MiB (applied at its next start)."),
) -> None:
    """Change a VM's HA setting, restart priority, description, department, start at host boot, or its vCPUs and
    memory (at its next start)."""
    body: dict[str, Any] = {}
    if (startup := startup_body(onboot, order, delay)) is not None:
        body["startup"] = startup
    if vcpus is not None:
        body["vcpus"] = parse_int(vcpus, "vcpus")
    if memory is not None:
        body["memory_mib"] = parse_int(memory, "memory")
    if ha is not None:
        if ha not in ("on", "off"):
            fail(f"--ha takes on or off, not {ha!r}")
        body["ha"] = ha == "on"
    if priority is not None:
        body["priority"] = parse_int(priority, "priority")
    if description is not None:
        body["description"] = description
    if department is not None:
        body["department"] = department
    v = client().patch(f"/v1/vms/{name}", json=body)
    if vcpus is not None or memory is not None:
        say_sizes(v)
        if set(body) <= {"vcpus", "memory_mib"}:
            return
    ha_text = f"HA on, priority {v['priority']}" if v["ha"] else "HA off"
    out.print(f"vm {name}: {ha_text}; {startup_text(v)}", markup=False, highlight=False)
    if v["ha"] and v.get("ha_blocked"):
        out.print(f"vm {name}: not restarted elsewhere now: {v['ha_blocked']}", markup=False, highlight=False)


def _firmware_text(v: dict[str, Any]) -> str:
    extra = [x for x, on in (("TPM 2.0", v.get("tpm")), (f"OS {v.get('os')}", v.get("os"))) if on]
    return ", ".join([v.get("firmware") or "bios", *extra])


def _ha_text(v: dict[str, Any]) -> str:
    if not v["ha"]:
        return "off"
    if v.get("ha_blocked"):
        return f"on, priority {v['priority']}; not restarted elsewhere now: {v['ha_blocked']}"
    armed = "; armed (restarted elsewhere if its host fails)" if v["ha_armed"] else ""
    return f"on, priority {v['priority']}{armed}"


@vm_app.command("log")
def vm_log(
    name: str,
    max_bytes: int = typer.Option(65536, "--bytes", help="How much of the end to show."),
    follow_: bool = typer.Option(False, "--follow", "-f", help="Then show what the guest writes, until Ctrl-C."),
) -> None:
    """The VM's serial console output."""
    if follow_:
        follow_log(name, max_bytes)
        return
    sys.stdout.write(client().text(f"/v1/vms/{name}/console", params={"max_bytes": max_bytes}))


register_console(vm_app)  # kasou vm console


@vm_app.command("history")
def vm_history(name: str, as_json: bool = typer.Option(False, "--json")) -> None:
    """The VM's uptime ledger: every state transition with its time and host."""
    events = client().get(f"/v1/vms/{name}/history")
    if as_json:
        print_json(events)
        return
    for e in events:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(e["time"]))
        out.print(f"{when}  {e['event']:10} {e['host'] or '-':12} {e['detail']}", markup=False, highlight=False)


# -- reports -------------------------------------------------------------------------

report_app = typer.Typer(help="Reports.", no_args_is_help=True)
app.add_typer(report_app, name="report")


@report_app.command("uptime")
def report_uptime(as_json: bool = typer.Option(False, "--json")) -> None:
    """Per VM: time since its last real stop, and how often it stopped (a migration is not a stop)."""
    rows = client().get("/v1/reports/uptime")
    if as_json:
        print_json(rows)
        return
    t = Table("name", "running", "uptime", "stops", "crashes", "migrations")
    for r in rows:
        t.add_row(
            r["name"], "yes" if r["running"] else "no", _uptime(r["uptime_s"]), str(r["stops"]), str(r["crashes"]),
            str(r["migrations"]),
        )  # fmt: skip
    out.print(t)


# -- jobs and the API -----------------------------------------------------------------


@job_app.command("show")
def job_show(job_id: str) -> None:
    """One job."""
    print_json(client().get(f"/v1/jobs/{job_id}"))


@job_app.command("cancel")
def job_cancel(job_id: str) -> None:
    """Cancel a running job (a cancelled migration leaves the VM running where it was)."""
    j = client().post(f"/v1/jobs/{job_id}/cancel")
    out.print(f"job {job_id}: {j['state']}", markup=False, highlight=False)


@job_app.command("list")
def job_list(vm: str = typer.Option(None, "--vm"), as_json: bool = typer.Option(False, "--json")) -> None:
    """Recent jobs."""
    jobs = client().get("/v1/jobs", params={"vm": vm} if vm else {})
    if as_json:
        print_json(jobs)
        return
    for j in jobs:
        error = (j.get("error") or {}).get("message", "")
        out.print(f"{j['id']}  {j['kind']:9} {j['vm'] or '-':16} {j['state']:9} {error}", markup=False)


@api_app.command("openapi")
def api_openapi() -> None:
    """Print the API's OpenAPI document (the checked-in copy is src/kasou/api/openapi.json)."""
    from kasou.api.spec import openapi_document

    print_json(openapi_document())


@app.command()
def demo(
    name: str = typer.Option("sample", help="Name of the sample VM."),
    timeout: float = typer.Option(120, help="Seconds to wait for the guest to be ready."),
) -> None:
    """The main job on one host: start kasou, build the tiny image, boot a sample VM."""
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


def main() -> None:
    try:
        app()
    except KasouError as e:
        err.print(f"error: {e.message}", markup=False, highlight=False, soft_wrap=True)
        sys.exit(1)
    except KeyboardInterrupt:
        err.print("error: interrupted", markup=False, highlight=False)
        sys.exit(130)


if __name__ == "__main__":
    main()
