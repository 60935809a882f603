"""``kasou network``: VM networks (hospital segments), each a bridge per host, optionally on a VLAN."""

from __future__ import annotations

from typing import Any

import typer

from kasou.cli.common import client, fail, out, parse_int, say
from kasou.cli.output import JSON, OUTPUT, Col, columns, render, render_one, view
from kasou.model.names import validate_name

network_app = typer.Typer(
    help="VM networks (segments such as clinical, imaging, mgmt): a bridge per host, optionally on an 802.1Q VLAN.",
    no_args_is_help=True,
)


def _vms(n: dict[str, Any]) -> str:
    return (", ".join(n["vms"][:5]) + (f" +{len(n['vms']) - 5}" if len(n["vms"]) > 5 else "")) or "-"


NET_COLS = [
    Col("name"),
    Col("vlan", "VLAN", lambda n: "isolated" if n.get("isolated") else "-" if n["vlan"] is None else str(n["vlan"])),
    Col("departments", text=lambda n: ", ".join(n.get("departments") or []) or "all"),
    Col("vms", "VMs", _vms),
    Col("description", text=lambda n: n["description"]),
    Col("isolated", hidden=True),
]


@network_app.command("create")
def network_create(
    name: str,
    vlan: str = typer.Option(None, "--vlan", help="802.1Q VLAN id, 1-4094 (default: untagged)."),
    description: str = typer.Option("", "--description"),
    department: list[str] = typer.Option(
        None, "--department", help="Only VMs of this department may use it (repeat for more; default: every one)."
    ),
    isolated: bool = typer.Option(
        False, "--isolated", help="Never connected to the hosts' uplink: its VMs reach only each other on a host."
    ),
    output: str = OUTPUT,
    column: list[str] = columns(NET_COLS),
    as_json: bool = JSON,
) -> None:
    """Define a network. Hosts make its bridge (kb-NAME) when a VM on it starts there."""
    v = view(output, column, as_json, NET_COLS)
    body: dict[str, Any] = {"name": name, "description": description, "isolated": isolated}
    if vlan is not None:
        body["vlan"] = parse_int(vlan, "vlan")
    if department:
        body["departments"] = list(department)
    n = client().post("/v1/networks", json=body)
    where = "isolated: no uplink" if n.get("isolated") else f"VLAN {n['vlan']}" if n["vlan"] is not None else "untagged"
    render_one(n, NET_COLS, v, human=lambda: say(f"network {n['name']}: created ({where}{_for_departments(n)})"))


def _for_departments(n: dict[str, Any]) -> str:
    deps = n.get("departments")
    return f"; for departments {', '.join(deps)} only" if deps else ""


@network_app.command("set")
def network_set(
    name: str,
    department: list[str] = typer.Option(
        None, "--department", help="Only VMs of this department may use it (repeat for more)."
    ),
    every: bool = typer.Option(False, "--all-departments", help="VMs of every department may use it."),
) -> None:
    """Set which departments' VMs may use a network (refused while a VM of a department left out is on it)."""
    validate_name(name, "network")  # here, not in the URL: "a/b" would be a path of its own
    if bool(department) == every:
        fail("give --department (once or more) or --all-departments")
    n = client().patch(f"/v1/networks/{name}", json={"departments": None if every else list(department)})
    who = "every department" if n["departments"] is None else f"departments {', '.join(n['departments'])} only"
    out.print(f"network {name}: for {who}", markup=False, highlight=False)


@network_app.command("list")
def network_list(output: str = OUTPUT, column: list[str] = columns(NET_COLS), as_json: bool = JSON) -> None:
    """The networks, their VLANs and the VMs on each (user, QEMU's NAT, is always there)."""
    v = view(output, column, as_json, NET_COLS)
    render(client().get("/v1/networks"), NET_COLS, v)


@network_app.command("delete")
def network_delete(name: str) -> None:
    """Delete a network no VM uses."""
    validate_name(name, "network")  # here, not in the URL: "a/b" would be a path of its own
    client().delete(f"/v1/networks/{name}")
    out.print(f"network {name}: deleted", markup=False, highlight=False)
