"""``kasou vm …``: defining, running, showing and changing VMs (the commands of one VM's life)."""

from __future__ import annotations

import sys
import time
from typing import Any

import typer

from kasou.cli.bulk import ALL, DEPARTMENT, HOST, PARALLEL, STATE, TAG, WINDOW, run_bulk, selector, tag_app
from kasou.cli.common import (
    client,
    err,
    fail,
    out,
    parse_int,
    read_text_file,
    say,
    uptime_text,
)
from kasou.cli.console import follow_log
from kasou.cli.console import register as register_console
from kasou.cli.devices import say_sizes
from kasou.cli.media import cd_text, media_app
from kasou.cli.output import JOB_COLS, JOB_COLUMN, JSON, OUTPUT, WAIT, Col, View, act, columns, render, render_one, view
from kasou.cli.transfer import vm_export, vm_import
from kasou.cli.vm_wait import register as register_wait
from kasou.model.units import format_size

vm_app = typer.Typer(help="Virtual machines.", no_args_is_help=True)
vm_app.add_typer(media_app, name="media")
vm_app.add_typer(tag_app, name="tag")


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
    criticality: str = typer.Option(
        None, "--criticality", help="24h-clinical, business-hours or batch (backups keep 5 or 3 generations)."
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
    tags: list[str] = typer.Option(None, "--tag", help="A tag (e.g. emr, ward-a; repeat for more)."),
    wait: bool = WAIT,
    output: str = OUTPUT,
    column: list[str] = JOB_COLUMN,
    as_json: bool = JSON,
) -> None:
    """Define a VM (thin qcow2 disk from an image, a linked clone of a template, or a blank disk and an ISO)."""
    v = view(output, column, as_json, JOB_COLS)
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
        "criticality": criticality,
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
        "tags": list(tags or []),
    }
    c = client()
    res = c.post("/v1/vms", json=body)
    host = res["vm"]["host"]
    job = act(c, res["job"], f"creating {name}", v, wait, queued=lambda j: f"vm {name}: being created on {host} "
              f"(job {j['id']})")  # fmt: skip
    if job is not None and v.human:
        say(f"vm {name}: {'created and started' if start else 'created'} on {host}")


def _action(name: str, action: str, wait: bool, v: View, timeout: float | None = None) -> None:
    c = client()
    params = {} if timeout is None else {"timeout": timeout}
    res = c.post(f"/v1/vms/{name}/actions/{action}", params=params)
    job = act(c, res["job"], f"{action} {name}", v, wait, queued=lambda j: f"vm {name}: {action} job {j['id']}")
    if job is not None and v.human:
        result = job.get("result") or {}
        how = f" ({result['detail']})" if result.get("detail") else ""  # a shutdown says what ended the guest
        say(f"vm {name}: {result.get('state', 'done')}{how}")


def _one_or_many(action: str, names: list[str], body: dict[str, Any] | None, wait: bool, v: View,
                 timeout: float | None = None) -> None:  # fmt: skip
    """One VM by its name (no selector), or the VMs a selector names as one bulk job."""
    if body is None:
        _action(names[0], action, wait, v, timeout)
    else:
        run_bulk(action, body, wait, v, timeout)


NAMES = typer.Argument(None, help="The VM (or VMs); or select them with --tag, --host, --department, --state, --all.")


@vm_app.command("start")
def vm_start(
    names: list[str] = NAMES, tag: list[str] = TAG, host: str = HOST, department: str = DEPARTMENT,
    state: str = STATE, all_: bool = ALL, parallel: str = PARALLEL, window: str = WINDOW, wait: bool = WAIT,
    output: str = OUTPUT, column: list[str] = JOB_COLUMN, as_json: bool = JSON,
) -> None:  # fmt: skip
    """Start a VM; or many as one job, in parallel per host, in start-up order (--onboot --order)."""
    v = view(output, column, as_json, JOB_COLS)
    _one_or_many("start", names, selector(names, tag, host, department, state, all_, parallel, window), wait, v)


@vm_app.command("shutdown")
def vm_shutdown(
    names: list[str] = NAMES,
    timeout: float = typer.Option(None, "--timeout", help="Seconds to wait before a hard stop (default 60)."),
    tag: list[str] = TAG, host: str = HOST, department: str = DEPARTMENT, state: str = STATE, all_: bool = ALL,
    parallel: str = PARALLEL, window: str = WINDOW, wait: bool = WAIT, output: str = OUTPUT,
    column: list[str] = JOB_COLUMN, as_json: bool = JSON,
) -> None:  # fmt: skip
    """Shut a VM down gracefully (its guest agent if one answers, else the ACPI power button), then stop it
    hard after a timeout; or many as one job (in reverse start-up order)."""
    v = view(output, column, as_json, JOB_COLS)
    _one_or_many("shutdown", names, selector(names, tag, host, department, state, all_, parallel, window), wait,
                 v, timeout)  # fmt: skip


@vm_app.command("stop")
def vm_stop(
    names: list[str] = NAMES, tag: list[str] = TAG, host: str = HOST, department: str = DEPARTMENT,
    state: str = STATE, all_: bool = ALL, parallel: str = PARALLEL, window: str = WINDOW, wait: bool = WAIT,
    output: str = OUTPUT, column: list[str] = JOB_COLUMN, as_json: bool = JSON,
) -> None:  # fmt: skip
    """Stop a VM at once (like pulling the plug); or many as one job."""
    v = view(output, column, as_json, JOB_COLS)
    _one_or_many("stop", names, selector(names, tag, host, department, state, all_, parallel, window), wait, v)


@vm_app.command("reboot")
def vm_reboot(
    name: str, wait: bool = WAIT, output: str = OUTPUT, column: list[str] = JOB_COLUMN, as_json: bool = JSON
) -> None:
    """Reset a VM (a hard reset of the virtual machine)."""
    _action(name, "reboot", wait, view(output, column, as_json, JOB_COLS))


@vm_app.command("pause")
def vm_pause(
    name: str, wait: bool = WAIT, output: str = OUTPUT, column: list[str] = JOB_COLUMN, as_json: bool = JSON
) -> None:
    """Pause a VM's vCPUs."""
    _action(name, "pause", wait, view(output, column, as_json, JOB_COLS))


@vm_app.command("resume")
def vm_resume(
    name: str, wait: bool = WAIT, output: str = OUTPUT, column: list[str] = JOB_COLUMN, as_json: bool = JSON
) -> None:
    """Resume a paused VM."""
    _action(name, "resume", wait, view(output, column, as_json, JOB_COLS))


@vm_app.command("delete")
def vm_delete(
    name: str,
    keep_disks: bool = typer.Option(False, "--keep-disks", help="Keep the disk files."),
    force: bool = typer.Option(False, "--force", help="Stop it first if it runs."),
    wait: bool = WAIT,
    output: str = OUTPUT,
    column: list[str] = JOB_COLUMN,
    as_json: bool = JSON,
) -> None:
    """Delete a VM: its process, its disks (unless --keep-disks) and its record."""
    v = view(output, column, as_json, JOB_COLS)
    c = client()
    res = c.delete(f"/v1/vms/{name}", params={"keep_disks": keep_disks, "force": force})
    if act(c, res["job"], f"deleting {name}", v, wait, queued=lambda j: f"vm {name}: delete job {j['id']}") and v.human:
        say(f"vm {name}: deleted")


@vm_app.command("migrate")
def vm_migrate(
    name: str,
    to: str = typer.Option(None, "--to", help="Destination host (default: the scheduler's choice)."),
    downtime_ms: str = typer.Option("100", "--downtime-ms", help="Longest pause the guest may see."),
    bandwidth: str = typer.Option(None, "--bandwidth", help="Cap the migration stream, MiB/s."),
    wait: bool = WAIT,
    output: str = OUTPUT,
    column: list[str] = JOB_COLUMN,
    as_json: bool = JSON,
) -> None:
    """Live-migrate a running VM to another host (its disks too, unless they are on shared storage)."""
    v = view(output, column, as_json, JOB_COLS)
    c = client()
    body: dict[str, Any] = {"to": to, "downtime_ms": parse_int(downtime_ms, "downtime_ms")}
    if bandwidth is not None:
        body["bandwidth_mib_s"] = parse_int(bandwidth, "bandwidth")
    res = c.post(f"/v1/vms/{name}/migrate", json=body)
    job = act(c, res["job"], f"migrating {name}", v, wait, timeout=1800,
              queued=lambda j: f"vm {name}: migrate job {j['id']}")  # fmt: skip
    if job is None:
        return
    r = job.get("result") or {}
    if v.human:
        say(f"vm {name}: migrated {r.get('from')} -> {r.get('to')} ({r.get('storage')} storage, "
            f"downtime {r.get('downtime_ms')} ms, total {r.get('total_ms')} ms)")  # fmt: skip
    for w in r.get("warnings") or []:  # e.g. its old copy could not be ended: an operator must act
        err.print(f"warning: {w}", markup=False, highlight=False, soft_wrap=True)


vm_app.command("import")(vm_import)  # kasou.cli.transfer
vm_app.command("export")(vm_export)


@vm_app.command("template")
def vm_template(name: str) -> None:
    """Freeze a stopped VM as a template for linked clones (kasou vm create --from NAME)."""
    client().post(f"/v1/vms/{name}/template")
    out.print(f"vm {name}: is now a template", markup=False, highlight=False)


def _disk0(v: dict[str, Any]) -> int | None:
    return v["disks"][0]["size_bytes"] if v.get("disks") else None


VM_COLS = [
    Col("name"),
    Col("state", text=lambda v: v["state"] if v["host_reachable"] else f"{v['state']} (host unreachable)"),
    Col("host"),
    Col("vcpus", "vCPU"),
    Col("memory_mib", "memory", lambda v: f"{v['memory_mib']} MiB"),
    Col("disk", value=_disk0, text=lambda v: "-" if _disk0(v) is None else format_size(_disk0(v) or 0)),
    Col("guest_ready", "ready"),
    Col("uptime_s", "uptime", lambda v: uptime_text(v["uptime_s"])),
    Col("tags", text=lambda v: ",".join(v.get("tags") or []) or "-"),
    *[Col(k, hidden=True) for k in ("uuid", "department", "criticality", "description", "image", "template", "cpu",
                                     "machine", "firmware", "storage", "ha", "priority", "anti_affinity",
                                     "accelerator", "host_reachable", "job", "last_error")],
]  # fmt: skip


@vm_app.command("list")
def vm_list(
    state: str = STATE, host: str = HOST, tag: list[str] = TAG, department: str = DEPARTMENT, output: str = OUTPUT,
    column: list[str] = columns(VM_COLS), as_json: bool = JSON,
) -> None:  # fmt: skip
    """All VMs (or those in a state, on a host, of a department, with tags) with their state, host, guest uptime
    and tags."""
    view_ = view(output, column, as_json, VM_COLS)
    params = {k: v for k, v in (("state", state), ("host", host), ("department", department)) if v is not None}
    render(client().get("/v1/vms", params={**params, "tag": list(tag or [])}), VM_COLS, view_)


@vm_app.command("show")
def vm_show(name: str, output: str = OUTPUT, column: list[str] = columns(VM_COLS), as_json: bool = JSON) -> None:
    """One VM in detail."""
    view_ = view(output, column, as_json, VM_COLS)
    v = client().get(f"/v1/vms/{name}")
    render_one(v, VM_COLS, view_, human=lambda: _show(v))


def _show(v: dict[str, Any]) -> None:
    rows = [
        ("name", v["name"]),
        ("uuid", v["uuid"]),
        ("department", v["department"] or "-"),
        ("tags", ", ".join(v.get("tags") or []) or "-"),
        ("criticality", v.get("criticality") or "-"),
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
        ("guest uptime", uptime_text(v["uptime_s"])),
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
    criticality: str = typer.Option(None, "--criticality", help="24h-clinical, business-hours or batch."),
    onboot: bool = typer.Option(None, "--onboot/--no-onboot", help="Start it when its host boots."),
    order: str = typer.Option(None, "--order", help="With --onboot: start order, 0..1000, lowest first."),
    delay: str = typer.Option(None, "--delay", help="With --onboot: seconds to wait before the next VM starts."),
    vcpus: str = typer.Option(None, "--vcpus", help="vCPUs (applied at its next start)."),
    memory: str = typer.Option(None, "--memory", help="Memory in MiB (applied at its next start)."),
    tags: list[str] = typer.Option(None, "--tag", help="Its tags, all of them (repeat; kasou vm tag add|remove)."),
    output: str = OUTPUT,
    column: list[str] = columns(VM_COLS),
    as_json: bool = JSON,
) -> None:
    """Change a VM's HA setting, restart priority, description, department, start at host boot, or its vCPUs and
    memory (at its next start)."""
    view_ = view(output, column, as_json, VM_COLS)
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
    if criticality is not None:
        body["criticality"] = criticality
    if tags:
        body["tags"] = list(tags)
    v = client().patch(f"/v1/vms/{name}", json=body)
    if not view_.human:
        render_one(v, VM_COLS, view_)
        return
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
register_wait(vm_app, VM_COLS)  # kasou vm wait


def _time(t: float | None) -> str:
    return "-" if t is None else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))


HISTORY_COLS = [Col("time", text=lambda e: _time(e["time"])), Col("event"), Col("host"), Col("detail")]


@vm_app.command("history")
def vm_history(
    name: str, output: str = OUTPUT, column: list[str] = columns(HISTORY_COLS), as_json: bool = JSON
) -> None:
    """The VM's uptime ledger: every state transition with its time and host."""
    v = view(output, column, as_json, HISTORY_COLS)
    events = client().get(f"/v1/vms/{name}/history")

    def human() -> None:
        for e in events:
            say(f"{_time(e['time'])}  {e['event']:10} {e['host'] or '-':12} {e['detail']}")

    render(events, HISTORY_COLS, v, human=human)


def startup_body(onboot: bool | None, order: str | None, delay: str | None) -> dict[str, Any] | None:
    """The ``startup`` of a VM from ``--onboot/--no-onboot --order N --delay S`` (None: none given)."""
    if onboot is None and order is None and delay is None:
        return None
    return {
        "onboot": True if onboot is None else onboot,
        "order": parse_int(order, "order") if order is not None else 0,
        "delay_s": parse_int(delay, "delay") if delay is not None else 0,
    }


def startup_text(v: dict[str, Any]) -> str:
    """How ``vm show`` says a VM's start-up settings."""
    s = v.get("startup")
    if not s or not s.get("onboot"):
        return "not started at host boot"
    delay = f", then {s['delay_s']} s before the next" if s.get("delay_s") else ""
    return f"at host boot, order {s['order']}{delay}"


def cloud_init_body(
    hostname: str | None, ssh_keys: list[str] | None, ip: str | None, gateway: str | None, dns: list[str] | None,
    user_data: str | None,
) -> dict[str, Any] | None:  # fmt: skip
    """A VM's ``cloud_init`` from ``vm create``'s options; the files (keys, user-data) are read here."""
    if not (hostname or ssh_keys or ip or gateway or dns or user_data):
        return None
    keys: list[str] = []
    for f in ssh_keys or []:
        keys += [ln.strip() for ln in read_text_file(f, "--ssh-key").splitlines() if ln.strip()]
    return {
        "hostname": hostname, "ssh_keys": keys, "ip": ip, "gateway": gateway, "dns": list(dns or []),
        "user_data": read_text_file(user_data, "--user-data") if user_data else None,
    }  # fmt: skip


def seed_text(v: dict[str, Any]) -> str:
    """How ``vm show`` says a VM's cloud-init seed."""
    ci = v.get("cloud_init")
    if not ci:
        return "none"
    parts = [f"hostname {ci.get('hostname') or v['name']}", f"address {ci.get('ip') or 'DHCP'}"]
    if ci.get("gateway"):
        parts.append(f"gateway {ci['gateway']}")
    if ci.get("ssh_keys"):
        parts.append(f"{len(ci['ssh_keys'])} SSH key{'s' if len(ci['ssh_keys']) != 1 else ''}")
    if ci.get("user_data"):
        parts.append("user-data")
    return ", ".join(parts)
