"""``kasou host shutdown-guests``: what becomes of a host's VMs when the host itself shuts down.

Without it a host's power-off ends each QEMU with SIGTERM when systemd stops the remaining processes: the
guests lose what their page caches held, and their databases recover at the next start. The
``kasou-guests.service`` unit runs this command when the system shuts down (its ``ExecStop``, ordered after
the agent and the API so both still answer), as libvirt-guests and Proxmox's pve-guests do:

1. In a cluster with another host up (``--migrate``, the default), the host enters **maintenance**: its VMs
   move to the other hosts by live migration (the maintenance job's own placement), and nothing is placed on
   it until an operator ends the maintenance after the reboot (``kasou host maintenance NAME --off``).
2. Whatever still runs there (a VM with local disks, no room elsewhere, a single host) is **shut down
   gracefully** as one bulk job: in the reverse of the start-up order (the application before its database),
   each VM through its guest agent, then the ACPI button, then a hard stop at the end of its time.

VMs marked ``--onboot`` start again when the host's agent starts after the boot. ``--if-system-stopping``
(the unit's) does nothing unless systemd says the system is going down: a ``systemctl restart`` of the unit,
or the package's upgrade, never stops a VM.
"""

from __future__ import annotations

import subprocess
from typing import Any

import typer

from kasou.cli.bulk import run_bulk
from kasou.cli.common import client, err, fail, follow, say
from kasou.cli.output import View
from kasou.config import host_name

SYSTEM_STATE_TIMEOUT_S = 10.0


def system_state() -> str:
    """What ``systemctl is-system-running`` says (``running``, ``degraded``, ``stopping``, ...), or why not."""
    try:
        r = subprocess.run(
            ["systemctl", "is-system-running"], capture_output=True, text=True, timeout=SYSTEM_STATE_TIMEOUT_S
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"unknown ({e})"
    return r.stdout.strip() or f"unknown ({r.stderr.strip() or 'no answer'})"


def shutdown_guests(
    host: str = typer.Option(None, "--host", help="The host (default: this one, KASOU_HOST_NAME)."),
    migrate: bool = typer.Option(
        True, "--migrate/--no-migrate", help="In a cluster, first move the VMs away (maintenance) by live migration."
    ),
    timeout: int = typer.Option(
        300, "--timeout", envvar="KASOU_GUESTS_TIMEOUT", help="Seconds for each VM's graceful shutdown."
    ),
    if_system_stopping: bool = typer.Option(
        False, "--if-system-stopping", help="Do nothing unless the system is shutting down (the systemd unit's)."
    ),
) -> None:
    """Move or gracefully shut down a host's VMs before the host itself shuts down."""
    if if_system_stopping:
        state = system_state()
        if state != "stopping":
            say(f"the system is not shutting down (systemctl is-system-running: {state}): VMs left running")
            return
    if timeout < 10 or timeout > 3600:
        fail(f"--timeout {timeout}: give 10 to 3600 seconds", 2)
    name = host or host_name()
    c = client(timeout=60)
    running = [v for v in c.get("/v1/vms", params={"host": name}) if v["state"] in ("running", "paused", "starting")]
    if not running:
        say(f"host {name}: no VM runs here")
        return
    if migrate:
        hosts = [h for h in c.get("/v1/hosts") if h["name"] != name]
        others = [h for h in hosts if h.get("state") == "up" and not h.get("maintenance")]
        if others:
            res = c.post(f"/v1/hosts/{name}/maintenance", params={"on": True})
            if res.get("job"):
                job = follow(c, res["job"], f"emptying {name}", timeout=max(600, 3 * timeout))
                moved = (job.get("result") or {}).get("moved", [])
                say(f"host {name}: in maintenance, {len(moved)} VMs moved; end it after the reboot with "
                    f"kasou host maintenance {name} --off")  # fmt: skip
                for w in (job.get("result") or {}).get("warnings") or []:
                    err.print(f"warning: {w}", markup=False, highlight=False, soft_wrap=True)
        elif hosts:  # a cluster whose other hosts are down or in maintenance
            say(f"host {name}: no other host up to move VMs to; shutting them down")
    end_guests({"host": name}, timeout)


def end_guests(where: dict[str, Any], timeout: int) -> None:
    """Shut down gracefully the running VMs ``where`` selects (a bulk selector: a host, or all), in the reverse
    of the start-up order; then stop the paused ones, whose guests cannot act on a shutdown request."""
    states = {v["state"] for v in client().get("/v1/vms", params={k: v for k, v in where.items() if k == "host"})}
    if "running" in states:
        run_bulk("shutdown", {**where, "state": "running"}, wait=True, v=View(), timeout=timeout)
    if "paused" in states:
        run_bulk("stop", {**where, "state": "paused"}, wait=True, v=View(), timeout=timeout)
