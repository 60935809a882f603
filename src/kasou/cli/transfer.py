"""``kasou vm import`` and ``kasou vm export``: existing systems in and out (registered in :mod:`kasou.cli.main`).

The files are on the host, in its transfer directory (``KASOU_TRANSFER_DIR``, default
``/var/lib/kasou/transfer``): a relative name is taken from there, an absolute one must lie inside it.
"""

from __future__ import annotations

from typing import Any

import typer

from kasou.cli.common import client, err, fail, parse_int, say
from kasou.cli.output import JOB_COLS, JOB_COLUMN, JSON, OUTPUT, WAIT, act, view
from kasou.model.units import format_size

DAY_S = 24 * 3600.0  # a conversion of terabytes takes hours; the job itself fails when qemu-img stalls


def vm_import(
    name: str,
    disk: list[str] = typer.Option(None, "--disk", help="A disk file to import (repeat; the boot disk first)."),
    ova: str = typer.Option(None, "--ova", help="An OVA (VMware's appliance archive) to import."),
    ovf: str = typer.Option(None, "--ovf", help="An OVF descriptor to import (its disk files beside it)."),
    firmware: str = typer.Option(None, "--firmware", help="bios, uefi or uefi-secure (default: the OVF's, else bios)."),
    tpm: bool = typer.Option(False, "--tpm", help="Give it a TPM 2.0 of its own (swtpm)."),
    convert: bool = typer.Option(
        False,
        "--convert",
        help="Run virt-v2v on its disks: VMware drivers and tools "
        "out, virtio in (needs the host's virt-v2v package; minutes under TCG).",
    ),
    vcpus: str = typer.Option(None, "--vcpus", help="vCPUs (default: the OVF's, else 1)."),
    memory: str = typer.Option(None, "--memory", help="Memory in MiB (default: the OVF's, else 1024)."),
    network: str = typer.Option("user", "--network", help="Network of its NICs (default: user, QEMU's NAT)."),
    cpu: str = typer.Option(None, "--cpu", help="Virtual CPU model (default x86-64-v2-AES; see vm create)."),
    machine: str = typer.Option(None, "--machine", help="q35 machine type (default: the host QEMU's, pinned)."),
    pool: str = typer.Option(None, "--pool", help="Storage pool of its disks (default: the built-in pool)."),
    host: str = typer.Option(None, "--host", help="The host whose transfer directory holds the files."),
    department: str = typer.Option(None, "--department", help="Department whose vendor manages it."),
    ha: bool = typer.Option(False, "--ha", help="High availability (see kasou vm create --help)."),
    priority: str = typer.Option("50", "--priority", help="HA restart order, 0..100, highest first."),
    anti_affinity: str = typer.Option(None, "--anti-affinity", help="Group whose VMs never share a host."),
    description: str = typer.Option("", "--description"),
    start: bool = typer.Option(False, "--start", help="Start it once imported."),
    wait: bool = WAIT,
    output: str = OUTPUT,
    column: list[str] = JOB_COLUMN,
    as_json: bool = JSON,
) -> None:
    """Import a VM from disk files (qcow2, raw, vmdk, vhd, vhdx) or a VMware OVA/OVF, converted into a pool.

    The files are paths on the host, in its transfer directory (KASOU_TRANSFER_DIR, default
    /var/lib/kasou/transfer); a relative path is taken from there."""
    v = view(output, column, as_json, JOB_COLS)
    if firmware is not None and firmware not in ("bios", "uefi", "uefi-secure"):
        fail(f"--firmware takes bios, uefi or uefi-secure, not {firmware!r}")
    body: dict[str, Any] = {
        "name": name, "disks": list(disk) if disk else None, "ova": ova, "ovf": ovf, "firmware": firmware, "tpm": tpm,
        "convert": convert,
        "vcpus": parse_int(vcpus, "vcpus") if vcpus is not None else None,
        "memory_mib": parse_int(memory, "memory") if memory is not None else None,
        "network": network, "cpu": cpu, "machine": machine, "pool": pool, "host": host, "department": department,
        "ha": ha, "priority": parse_int(priority, "priority"), "anti_affinity": anti_affinity,
        "description": description, "start": start,
    }  # fmt: skip
    c = client()
    res = c.post("/v1/imports", json=body)
    host_name = res["vm"]["host"]
    if v.human:
        say(f"importing {name} on host {host_name}:")
        for line in res["report"]["lines"]:
            say(f"  {line}")
    job = act(c, res["job"], f"importing {name}", v, wait, timeout=DAY_S,
              queued=lambda j: f"vm {name}: import job {j['id']}")  # fmt: skip
    if job is None or not v.human:
        return
    for line in (job.get("result") or {}).get("report") or []:
        if line.startswith("v2v "):
            say(f"  {line}")
    disks = res["report"]["disks"]
    size = format_size(sum(d["size_bytes"] for d in disks))
    what = "imported and started" if start else "imported"
    say(f"vm {name}: {what} on {host_name} ({len(disks)} disk{'s' if len(disks) != 1 else ''}, {size})")


def vm_export(
    name: str,
    ova: str = typer.Option(..., "--ova", help="The OVA to write, in the host's transfer directory."),
    wait: bool = WAIT,
    output: str = OUTPUT,
    column: list[str] = JOB_COLUMN,
    as_json: bool = JSON,
) -> None:
    """Export a stopped VM as an OVA (streamOptimized vmdk disks, OVF descriptor, SHA256 manifest).

    The file is written on the VM's host, in its transfer directory (KASOU_TRANSFER_DIR)."""
    v = view(output, column, as_json, JOB_COLS)
    c = client()
    res = c.post(f"/v1/vms/{name}/export", json={"ova": ova})
    job = act(c, res["job"], f"exporting {name}", v, wait, timeout=DAY_S,
              queued=lambda j: f"vm {name}: export job {j['id']}")  # fmt: skip
    if job is None:
        return
    r = job.get("result") or {}
    if v.human:
        say(f"vm {name}: exported to {r.get('file')} on host {r.get('host')} ({format_size(int(r.get('bytes') or 0))})")
    for w in r.get("warnings") or []:
        err.print(f"warning: {w}", markup=False, highlight=False, soft_wrap=True)
