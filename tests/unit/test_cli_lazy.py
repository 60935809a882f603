"""The command groups load when a command line names them (kasou.cli.output.KasouGroup.LAZY): the tree a fresh
``kasou`` process builds that way is the one the modules define, every command of every group there (a group
of one command stays a group: ``kasou event list``; commands another module adds to a group come with it:
``kasou disk add``)."""

from __future__ import annotations

import importlib
import json
import pkgutil
import subprocess
import sys
from typing import Any

import typer

import kasou.cli
from kasou.cli.main import app
from kasou.cli.output import KasouGroup

LAZY_WALK = """
import json, typer
from kasou.cli.main import app
from kasou.cli.output import subcommands
def walk(cmd, path):
    out = [path]
    for n, sub in subcommands(cmd):
        out += walk(sub, path + " " + n)
    return out
print(json.dumps(walk(typer.main.get_command(app), "kasou")))
"""


def walk(cmd: Any, path: str) -> list[str]:
    out = [path]
    for name, sub in getattr(cmd, "commands", {}).items():
        out += walk(sub, f"{path} {name}")
    return out


def test_the_lazy_tree_is_the_tree_the_modules_define() -> None:
    r = subprocess.run([sys.executable, "-c", LAZY_WALK], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    lazy = json.loads(r.stdout)
    # The reference: every kasou.cli module imported, each group added as add_typer adds it.
    for m in pkgutil.iter_modules(kasou.cli.__path__):
        importlib.import_module(f"kasou.cli.{m.name}")
    eager = {g.name: g.typer_instance for g in app.registered_groups}
    ref = typer.Typer()
    for c in app.registered_commands:
        ref.registered_commands.append(c)
    for name, target in KasouGroup.LAZY.items():
        if target:
            module, _, attr = target.partition(":")
            eager[name] = getattr(importlib.import_module(module), attr)
        ref.add_typer(eager[name], name=name)
    expected = walk(typer.main.get_command(ref), "kasou")
    assert sorted(lazy) == sorted(expected)
    assert "kasou event list" in lazy and "kasou disk add" in lazy and "kasou cluster balance" in lazy
