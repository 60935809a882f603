"""``kasou vm tag add|remove`` and the bulk form of ``kasou vm start|shutdown|stop`` (``--tag``, ``--host``,
``--department``, ``--state``, ``--all``): many VMs as one job (``POST /v1/vms/actions/{action}``)."""

from __future__ import annotations

from typing import Any

import typer
from rich.table import Table

from kasou.cli.common import client, fail, out, parse_int, say
from kasou.cli.output import View, act

tag_app = typer.Typer(help="Tags on VMs (e.g. emr, ward-a): lists filter on them, bulk actions select by them.",
                      no_args_is_help=True)  # fmt: skip


@tag_app.command("add")
def tag_add(name: str, tags: list[str] = typer.Argument(..., help="Tags to add.")) -> None:
    """Add tags to a VM."""
    v = client().patch(f"/v1/vms/{name}", json={"add_tags": tags})
    say(f"vm {name}: tags {', '.join(v['tags']) or '-'}")


@tag_app.command("remove")
def tag_remove(name: str, tags: list[str] = typer.Argument(..., help="Tags to remove.")) -> None:
    """Remove tags from a VM."""
    v = client().patch(f"/v1/vms/{name}", json={"remove_tags": tags})
    say(f"vm {name}: tags {', '.join(v['tags']) or '-'}")


TAG = typer.Option(None, "--tag", help="The VMs with this tag (repeat: with all of them).")
HOST = typer.Option(None, "--host", help="The VMs of this host.")
DEPARTMENT = typer.Option(None, "--department", help="The VMs of this department.")
STATE = typer.Option(None, "--state", help="The VMs in this state (e.g. crashed).")
ALL = typer.Option(False, "--all", help="Every VM (templates never).")
PARALLEL = typer.Option(None, "--parallel", help="Operations at once per host (default: from its CPUs).")
WINDOW = typer.Option(None, "--window", help="A vendor: the maintenance window to act under.")


def selector(
    names: list[str] | None, tags: list[str] | None, host: str | None, department: str | None, state: str | None,
    all_: bool, parallel: str | None, window: str | None,
) -> dict[str, Any] | None:  # fmt: skip
    """The body of a bulk action; None for one VM named and nothing else (the single-VM route)."""
    names = list(names or [])
    if len(names) == 1 and not (tags or host or department or state or all_ or parallel or window):
        return None
    body: dict[str, Any] = {"names": names, "tags": list(tags or []), "host": host, "department": department,
                            "state": state, "all": all_, "window": window}  # fmt: skip
    if parallel is not None:
        body["per_host"] = parse_int(parallel, "parallel")
    return {k: v for k, v in body.items() if v not in (None, [], False)}


def run_bulk(action: str, body: dict[str, Any], wait: bool, v: View, timeout: float | None = None) -> None:
    """Submit a bulk action, follow its job and print a line per VM (or the job: -o); exit 1 if a VM failed."""
    if not body:
        fail(f"say which VMs to {action}: a name, --tag, --host, --department, --state, or --all for every VM", 2)
    if timeout is not None:
        body["timeout"] = int(timeout)
    c = client()
    res = c.post(f"/v1/vms/actions/{action}", json=body)
    n = len(res["vms"])
    job = act(c, res["job"], f"{action} {n} VMs", v, wait, timeout=3600,
              queued=lambda j: f"{action} of {n} VMs: job {j['id']}")  # fmt: skip
    if job is None:
        return
    r = job.get("result") or {}
    if v.human:
        t = Table("name", "host", "outcome", "why")
        for x in r.get("vms", []):
            t.add_row(x["vm"], x.get("host") or "-", x["outcome"], x.get("reason") or x.get("detail") or "")
        out.print(t)
        say(f"{action}: {r.get('succeeded', 0)} succeeded, {r.get('failed', 0)} failed, {r.get('skipped', 0)} "
            f"skipped in {r.get('elapsed_s', 0)} s")  # fmt: skip
    if r.get("failed"):
        raise typer.Exit(1)
