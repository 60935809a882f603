"""Shell completion: ``kasou completion bash|zsh`` prints the script a shell sources, and the shell then asks
``kasou`` itself (with ``_KASOU_COMPLETE`` set) what may come next: commands, options, and the names of the VMs,
hosts, networks and pools the API knows.

::

    kasou completion bash > /etc/bash_completion.d/kasou      # or: source <(kasou completion bash)
    kasou completion zsh > "${fpath[1]}/_kasou"

Names are asked of the API with the caller's token (``KASOU_TOKEN`` or the token file) within
:data:`NAMES_TIMEOUT_S`; when it cannot answer (not running, no token) the shell simply offers no names.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import typer
import typer.completion
import typer.main

from kasou.cli.output import KasouGroup
from kasou.errors import KasouError

COMPLETE_VAR = "_KASOU_COMPLETE"
SHELLS = ("bash", "zsh")
NAMES_TIMEOUT_S = 2.0

#: Where each kind of name is listed in the API.
LISTS = {"vms": "/v1/vms", "hosts": "/v1/hosts", "networks": "/v1/networks", "pools": "/v1/pools",
         "desktop-pools": "/v1/desktop-pools"}  # fmt: skip
#: The command groups whose ``NAME`` argument names one of their kind.
GROUPS = {"vm": "vms", "host": "hosts", "network": "networks", "pool": "pools", "desktop-pool": "desktop-pools",
          "snapshot": "vms", "backup": "vms"}  # fmt: skip
#: Arguments that name a kind wherever they are.
ARGUMENTS = {"vm": "vms", "host": "hosts", "network": "networks", "pool": "pools"}


def script(shell: str) -> str:
    """The completion script of ``shell`` (bash or zsh)."""
    if shell not in SHELLS:
        raise KasouError(f"no completion for the shell {shell!r}: {' or '.join(SHELLS)}")
    typer.completion.completion_init()
    return str(typer.completion.get_completion_script(prog_name="kasou", complete_var=COMPLETE_VAR, shell=shell))


def names(kind: str) -> list[str]:
    """The names of ``kind`` the API lists now; none if it cannot be asked in time."""
    from kasou.cli.common import client

    try:
        c = client(timeout=NAMES_TIMEOUT_S)
        return sorted(str(x["name"]) for x in c.get(LISTS[kind]) if isinstance(x, dict) and "name" in x)
    except Exception:
        return []


def _completer(kind: str) -> Callable[[Any, str], list[Any]]:
    def complete(ctx: Any, incomplete: str) -> list[Any]:
        item = typer.completion.shell_completion.CompletionItem
        return [item(n) for n in names(kind) if n.startswith(incomplete)]

    return complete


def _kind(path: tuple[str, ...], param: Any) -> str | None:
    name = getattr(param, "name", None)
    if getattr(param, "param_type_name", None) != "argument" or name is None:
        return None
    if name in ARGUMENTS:
        return ARGUMENTS[name]
    if name in ("name", "names") and path and path[0] in GROUPS:
        return GROUPS[path[0]]
    return None


def with_names(command: Any, path: tuple[str, ...] = ()) -> Any:
    """``command`` (Typer's command tree) with the arguments that name a VM, host, network or pool completing
    from the API: each such argument's ``shell_complete`` answers the names."""
    for p in command.params:
        kind = _kind(path, p)
        if kind is not None:
            p.shell_complete = _completer(kind)
    for name, sub in getattr(command, "commands", {}).items():
        with_names(sub, (*path, name))
    if not path:  # the root: its groups loaded later (kasou.cli.output.KasouGroup) get their names as they load
        KasouGroup.on_load = lambda name, group: with_names(group, (name,))
    return command


def complete(app: typer.Typer) -> None:
    """Answer the shell that asked (``_KASOU_COMPLETE`` is set), then exit."""
    typer.completion.completion_init()
    command = with_names(typer.main.get_command(app))
    command.main(prog_name="kasou", complete_var=COMPLETE_VAR)


def wanted() -> bool:
    return COMPLETE_VAR in os.environ
