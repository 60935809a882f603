"""``kasou lab``: a multi-host kasou environment on this one machine (see :mod:`kasou.lab.hosts`).

Registered in the main CLI with ``app.add_typer(lab_app, name="lab")``. The lab code (and
pyroute2, ~0.4 s to import) is imported only when a lab command runs, so the rest of the CLI
does not pay for it. Errors print one line (``error: ...``) on stderr and exit with their status
(:func:`kasou.cli.output.exit_code`).
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar

import typer

from kasou.cli.output import COLUMN, JSON, OUTPUT, cols, exit_code, render_one, view
from kasou.errors import KasouError

if TYPE_CHECKING:
    from kasou.lab.hosts import Lab

P = ParamSpec("P")
R = TypeVar("R")

lab_app = typer.Typer(
    help="A multi-host lab on this machine: hosts in network namespaces, a 3-member etcd (root only).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


def _lab() -> Lab:
    from kasou.lab.hosts import Lab

    return Lab()


def _say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def _errors(fn: Callable[P, R]) -> Callable[P, R]:
    """One line on stderr and status 1 for kasou's errors (also when run outside kasou's main)."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return fn(*args, **kwargs)
        except KasouError as e:
            sys.stderr.write(f"error: {e.message}\n")
            raise typer.Exit(exit_code(e)) from None
        except KeyboardInterrupt:
            sys.stderr.write("error: interrupted\n")
            raise typer.Exit(130) from None

    return wrapper


@lab_app.command("up")
@_errors
def lab_up(
    hosts: int = typer.Option(3, "--hosts", "-n", help="How many hosts (h1..hN)."),
    timeout: float = typer.Option(90, "--timeout", help="Seconds to wait for the services to answer."),
    backup_server: bool = typer.Option(
        False, "--backup-server", help="Also a backup server in a namespace of its own; kasou copies backups to it."
    ),
    directory: bool = typer.Option(
        False,
        "--directory",
        help="Also a Samba AD domain controller in a namespace of its own, with test users "
        "and groups; kasou signs them in (kasou.lab.directory).",
    ),
) -> None:
    """Create (or repair) the lab: bridges klab0 and klab-vm, hosts h1..hN in network namespaces, etcd, services."""
    for line in _lab().up(hosts, timeout=timeout, backup_server=backup_server, directory=directory):
        _say(line)


@lab_app.command("down")
@_errors
def lab_down() -> None:
    """Remove the whole lab: every process (QEMUs too), etcd, namespaces, links, the lab directory."""
    for line in _lab().down():
        _say(line)


@lab_app.command("status")
@_errors
def lab_status(output: str = OUTPUT, column: list[str] = COLUMN, as_json: bool = JSON) -> None:
    """Hosts (address, namespace, services, link) and etcd members (-c: dir, bridge, hosts, etcd, ...)."""
    v = view(output, column, as_json)
    st = _lab().status()
    if not v.human:
        render_one(st, cols(*st), v)
        return
    br, vm_br = st["bridge"], st["vm_bridge"]
    _say(f"lab {st['dir']}  bridge {br['name']} {br['address']}, VM bridge {vm_br['name']}")
    for h in st["hosts"]:
        svc = []
        for s in ("agent", "api"):
            x: dict[str, Any] = h[s]
            state = "answers" if x["answers"] else ("alive" if x["alive"] else "down")
            svc.append(f"{s} {state}" + (f" (pid {x['pid']})" if x["alive"] else ""))
        ns = h["netns"] if h["netns_exists"] else f"{h['netns']} (missing)"
        link = f"link {h['link']:7} vm link {h['vm_link']:7}"
        _say(f"{h['name']:4} {h['address']:12} netns {ns:12} {link} " + ", ".join(svc))
    for m in st["etcd"]:
        state = "healthy" if m["healthy"] else ("alive" if m["alive"] else "down")
        _say(f"etcd {m['name']:3} {m['client_url']:24} {state}" + (f" (pid {m['pid']})" if m["alive"] else ""))
    if st.get("backup_server"):
        _say(backup_server_line(st["backup_server"]))
    if st.get("directory"):
        d = st["directory"]
        state = "answers" if d["answers"] else ("alive" if d["alive"] else "down")
        ns = d["netns"] if d["netns_exists"] else f"{d['netns']} (missing)"
        pid = f" (pid {d['pid']})" if d["alive"] else ""
        _say(f"directory     {d['address']:12} netns {ns} link {d['link']} {d['url']} {d['realm']} {state}{pid}")


def backup_server_line(b: dict[str, Any]) -> str:
    """The status line of the lab's backup server."""
    state = "answers" if b["answers"] else ("alive" if b["alive"] else "down")
    ns = b["netns"] if b["netns_exists"] else f"{b['netns']} (missing)"
    pid = f" (pid {b['pid']})" if b["alive"] else ""
    return f"backup server {b['address']:12} netns {ns} link {b['link']} {b['url']} {state}{pid}"


@lab_app.command("kill")
@_errors
def lab_kill(host: str = typer.Argument(..., help="h1, h2, ...")) -> None:
    """Power loss: SIGKILL the host's agent, API and QEMUs (its namespace stays; see revive)."""
    pids = _lab().kill(host)
    _say(f"{host}: killed {len(pids)} processes" + (f" ({', '.join(map(str, pids))})" if pids else ""))


@lab_app.command("revive")
@_errors
def lab_revive(
    host: str = typer.Argument(..., help="h1, h2, ..."),
    timeout: float = typer.Option(90, "--timeout", help="Seconds to wait for the services to answer."),
) -> None:
    """Start a killed host's services again."""
    for line in _lab().revive(host, timeout=timeout):
        _say(line)


@lab_app.command("partition")
@_errors
def lab_partition(
    host: str = typer.Argument(..., help="h1, h2, ..."),
    heal: bool = typer.Option(False, "--heal", help="Restore the link instead of cutting it."),
) -> None:
    """Cut the host's management link (its veth goes down; VM traffic keeps its own), or restore it with --heal."""
    _say(_lab().partition(host, heal=heal))


@lab_app.command("env")
@_errors
def lab_env(host: str = typer.Argument(..., help="h1, h2, ...")) -> None:
    """Print export lines to drive that host's API from this shell: eval "$(kasou lab env h1)"."""
    for line in _lab().env(host):
        _say(line)


def main() -> None:
    """Run the lab commands on their own: python -c 'from kasou.cli.lab import main; main()' up."""
    lab_app()
