"""``kasou disk add|remove|resize`` and ``kasou nic add|remove|list``: disks and NICs that change (hot-plug on a
running VM). The ``disk`` commands join :data:`kasou.cli.storage.disk_app`."""

from __future__ import annotations

from typing import Any

import typer

from kasou.api.client import Client
from kasou.cli.common import client, say
from kasou.cli.output import JOB_COLS, JOB_COLUMN, JSON, OUTPUT, WAIT, Col, View, act, columns, render, view
from kasou.cli.storage import disk_app
from kasou.model.names import validate_name
from kasou.model.units import format_size, parse_size

nic_app = typer.Typer(help="NICs of VMs: add and remove (hot-plug while the VM runs).", no_args_is_help=True)


def _run(c: Client, res: dict[str, Any], title: str, wait: bool, v: View) -> dict[str, Any]:
    """Follow the job (unless --no-wait); its result when the command is to say it in words, else {}."""
    job = act(c, res["job"], title, v, wait, timeout=300)
    return dict(job.get("result") or {"done": True}) if job is not None and v.human else {}


def _how(r: dict[str, Any]) -> str:
    return " (hot-plugged: the guest sees it now)" if r.get("hotplug") else " (the VM sees it at its next start)"


@disk_app.command("add")
def disk_add(
    vm: str,
    size: str = typer.Option(..., "--size", help="Its size, e.g. 10G."),
    pool: str = typer.Option(None, "--pool", help="Pool of its file (default: the boot disk's)."),
    wait: bool = WAIT,
    output: str = OUTPUT,
    column: list[str] = JOB_COLUMN,
    as_json: bool = JSON,
) -> None:
    """Give a VM a new empty disk (plugged in at once if it runs)."""
    v = view(output, column, as_json, JOB_COLS)
    validate_name(vm)
    parse_size(size, "size")
    c = client()
    res = c.post(f"/v1/vms/{vm}/disks", json={"size": size, "pool": pool})
    r = _run(c, res, f"adding a {size} disk to {vm}", wait, v)
    if r:
        say(f"vm {vm}: disk {r['disk']} added, {size}{_how(r)}")


@disk_app.command("remove")
def disk_remove(
    vm: str, disk: str, wait: bool = WAIT, output: str = OUTPUT, column: list[str] = JOB_COLUMN, as_json: bool = JSON
) -> None:
    """Remove a disk from a VM and delete its file (unplugged first if the VM runs; never the boot disk)."""
    v = view(output, column, as_json, JOB_COLS)
    validate_name(vm)
    c = client()
    res = c.delete(f"/v1/vms/{vm}/disks/{disk}")
    r = _run(c, res, f"removing {disk} of {vm}", wait, v)
    if r:
        say(f"vm {vm}: disk {disk} removed" + (" (unplugged)" if r.get("hotplug") else ""))


@disk_app.command("resize")
def disk_resize(
    vm: str,
    disk: str,
    size: str,
    wait: bool = WAIT,
    output: str = OUTPUT,
    column: list[str] = JOB_COLUMN,
    as_json: bool = JSON,
) -> None:
    """Grow a disk to SIZE (online while the VM runs); a disk never shrinks. The guest's partition and file
    system are grown inside the guest (growpart, resize2fs)."""
    v = view(output, column, as_json, JOB_COLS)
    validate_name(vm)
    parse_size(size, "size")
    c = client()
    res = c.post(f"/v1/vms/{vm}/disks/{disk}/resize", json={"size": size})
    r = _run(c, res, f"growing {disk} of {vm} to {size}", wait, v)
    if r:
        how = "online: the guest sees it now" if r.get("online") else "offline"
        say(f"vm {vm}: disk {disk} is {format_size(int(r['size_bytes']))} ({how})")


@nic_app.command("add")
def nic_add(
    vm: str,
    network: str = typer.Option(..., "--network", help="Its network: user (QEMU's NAT) or one of kasou network list."),
    wait: bool = WAIT,
    output: str = OUTPUT,
    column: list[str] = JOB_COLUMN,
    as_json: bool = JSON,
) -> None:
    """Give a VM a new NIC with a MAC of its own (plugged in at once if it runs)."""
    v = view(output, column, as_json, JOB_COLS)
    validate_name(vm)
    c = client()
    res = c.post(f"/v1/vms/{vm}/nics", json={"network": network})
    r = _run(c, res, f"adding a NIC on {network} to {vm}", wait, v)
    if r:
        say(f"vm {vm}: NIC {r['nic']} on {network}, MAC {r['mac']}{_how(r)}")


@nic_app.command("remove")
def nic_remove(
    vm: str, nic: str, wait: bool = WAIT, output: str = OUTPUT, column: list[str] = JOB_COLUMN, as_json: bool = JSON
) -> None:
    """Remove a NIC from a VM (unplugged first if the VM runs)."""
    v = view(output, column, as_json, JOB_COLS)
    validate_name(vm)
    c = client()
    res = c.delete(f"/v1/vms/{vm}/nics/{nic}")
    r = _run(c, res, f"removing {nic} of {vm}", wait, v)
    if r:
        say(f"vm {vm}: NIC {nic} removed" + (" (unplugged)" if r.get("hotplug") else ""))


NIC_COLS = [Col("id", "nic"), Col("network"), Col("vlan"), Col("mac"), Col("port", "hot-plug port")]


@nic_app.command("list")
def nic_list(vm: str, output: str = OUTPUT, column: list[str] = columns(NIC_COLS), as_json: bool = JSON) -> None:
    """A VM's NICs: network, VLAN, MAC, and whether it can be unplugged while the VM runs."""
    v = view(output, column, as_json, NIC_COLS)
    validate_name(vm)
    render(client().get(f"/v1/vms/{vm}")["nics"], NIC_COLS, v)


def say_sizes(v: dict[str, Any]) -> None:
    """What ``kasou vm set --vcpus/--memory`` changed: now (a stopped VM) or at its next start (a running one)."""
    later = v.get("next_start") or {}
    if later:
        then = f"{later.get('vcpus', v['vcpus'])} vCPUs, {later.get('memory_mib', v['memory_mib'])} MiB"
        say(f"vm {v['name']}: {then} at its next start (it runs with {v['vcpus']} vCPUs, {v['memory_mib']} MiB until "
            "then)")  # fmt: skip
    else:
        say(f"vm {v['name']}: {v['vcpus']} vCPUs, {v['memory_mib']} MiB")
