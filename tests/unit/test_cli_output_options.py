"""Every command that prints a table, JSON or a job takes -o/--output and -c/--column (kasou.cli.output), so a
new command cannot forget them; and the machinery itself: formats, columns, exit codes."""

from __future__ import annotations

import inspect
import json
import re
from collections.abc import Iterator
from typing import Any

import pytest
import typer
import yaml
from typer.main import get_command
from typer.testing import CliRunner

from kasou import errors as E
from kasou.cli import output
from kasou.cli.main import app
from kasou.cli.output import Col, View, exit_code, render, render_one, subcommands, view

# What a command's code does when it prints data: a Rich table, JSON, a job followed, the shared renderers.
PRINTS_DATA = re.compile(r"\bTable\(|print_json\(|json\.dumps\(|\brender(_one)?\(|\bact\(|\bfollow\(|--json")

# Commands that print data but not as rows or fields, each with its reason.
EXEMPT = {
    "kasou api openapi": "the OpenAPI document itself (JSON always)",
    "kasou demo": "a demo: boots a VM and says where",
    "kasou down": "stops the services; lines of what it did",
    "kasou audit export": "the export itself (-o json|yaml or a file: --to)",
    "kasou backup key export": "a key file's content (JSON or its paper copy)",
    "kasou image build": "a build's progress and one line",
    "kasou image import": "an import's progress and one line",
    "kasou host shutdown-guests": "run by systemd as the host shuts down: lines for the journal",
}


def commands() -> Iterator[tuple[str, Any]]:
    def walk(cmd: Any, path: str) -> Iterator[tuple[str, Any]]:
        if hasattr(cmd, "commands"):
            if cmd.callback is not None and getattr(cmd, "invoke_without_command", False):
                yield path, cmd  # a group that lists when run alone (kasou console recordings)
            for name, sub in subcommands(cmd):  # the lazily loaded groups too
                yield from walk(sub, f"{path} {name}")
        else:
            yield path, cmd

    yield from walk(get_command(app), "kasou")


def source(cmd: Any) -> str:
    fn = inspect.unwrap(cmd.callback)
    try:
        return inspect.getsource(fn)
    except (OSError, TypeError):
        return ""


def options(cmd: Any) -> set[str]:
    return {o for p in cmd.params for o in (*p.opts, *p.secondary_opts)}


def test_every_command_that_prints_data_takes_output_and_column() -> None:
    missing = []
    seen = 0
    for path, cmd in commands():
        opts = options(cmd)
        # a table, JSON or a job in its body, or a job (--no-wait) or --json through a helper
        if path in EXEMPT or not (PRINTS_DATA.search(source(cmd)) or opts & {"--no-wait", "--json", "-o"}):
            continue
        seen += 1
        if not {"-o", "--output", "-c", "--column"} <= opts:
            missing.append(path)
        json_opt = [p for p in cmd.params if "--json" in p.opts]
        assert all(p.hidden for p in json_opt), f"{path}: --json is a hidden alias of -o json"
    assert seen > 60, seen
    assert not missing, f"commands that print data without -o/-c (see kasou.cli.output): {missing}"


def test_the_exemptions_are_real_commands() -> None:
    assert set(EXEMPT) <= {path for path, _ in commands()}


def test_the_help_tells_the_exit_codes() -> None:
    r = CliRunner().invoke(app, ["--help"], env={"COLUMNS": "200"})
    assert r.exit_code == 0
    text = " ".join(r.output.split())
    for code, word in ((0, "ok"), (1, "error"), (2, "usage"), (3, "not found"), (4, "conflict"), (5, "timeout")):
        assert f"{code} {word}" in text


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (E.NotFound("x"), 3), (E.ImageNotFound("x"), 3), (E.Conflict("x"), 4), (E.AlreadyExists("x"), 4),
        (E.WrongState("x"), 4), (E.InsufficientResources("x"), 4), (E.InvalidSpec("x"), 2),
        (E.OperationTimeout("x"), 5), (E.AgentUnavailable("x"), 1), (E.Forbidden("x"), 1),
        (E.HypervisorError("x"), 1), (E.KasouError("x"), 1),
    ],
)  # fmt: skip
def test_exit_codes_follow_the_apis_statuses(error: E.KasouError, code: int) -> None:
    assert exit_code(error) == code
    assert exit_code(E.from_dict(error.to_dict())) == code  # as the client re-raises what the API sent


COLS = [Col("name"), Col("size", "SIZE", text=lambda r: f"{r['size']} B"), Col("tags"), Col("note", hidden=True)]
ROWS = [{"name": "a", "size": 1, "tags": ["x", "y"], "note": None}, {"name": "b", "size": 2, "tags": [], "note": "n"}]


def test_render_formats(capsys: pytest.CaptureFixture[str]) -> None:
    render(ROWS, COLS, view("json"))
    assert json.loads(capsys.readouterr().out) == ROWS
    render(ROWS, COLS, view("yaml"))
    assert yaml.safe_load(capsys.readouterr().out) == ROWS
    render(ROWS, COLS, view("value"))
    assert capsys.readouterr().out == "a\t1\tx,y\nb\t2\t\n"
    render(ROWS, COLS, view("value", ["note", "name"]))
    assert capsys.readouterr().out == "\ta\nn\tb\n"
    render(ROWS, COLS, view("json", ["size"]))
    assert json.loads(capsys.readouterr().out) == [{"size": 1}, {"size": 2}]
    render_one(ROWS[0], COLS, view("value", ["tags"]))
    assert capsys.readouterr().out == "x,y\n"
    render_one(ROWS[0], COLS, view(as_json=True), data={"whole": True})
    assert json.loads(capsys.readouterr().out) == {"whole": True}
    said: list[str] = []
    render(ROWS, COLS, view("table"), human=lambda: said.append("human"))
    assert said == ["human"]  # the usual output for people
    render(ROWS, COLS, view("table", ["size"]), human=lambda: said.append("again"))
    assert said == ["human"] and "SIZE" in capsys.readouterr().out  # -c: a table of those columns


def test_unknown_columns_and_formats_are_usage_errors() -> None:
    with pytest.raises(typer.BadParameter, match="unknown column 'nope'; the columns are: name, size, tags, note"):
        view("table", ["nope"], cols=COLS)
    with pytest.raises(typer.BadParameter, match="not one of table, json, yaml, value"):
        view("xml")
    assert view("JSON").format == "json" and view("table", ["a,b", "c"]).columns == ("a", "b", "c")
    assert View("table").human and not View("table", ("a",)).human and not View("json").human


def test_the_module_docstring_shows_how() -> None:
    doc = output.__doc__ or ""
    for word in ("render(", "act(", "Col(", "view(", "--no-wait", "Exit codes"):
        assert word in doc
