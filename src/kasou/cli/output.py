"""Scriptable output for every ``kasou`` command: formats, columns, jobs and exit codes, in one place.

Every command that prints data takes ``-o/--output table|json|yaml|value`` and ``-c/--column NAME``
(repeatable: only those columns or fields, in that order; an unknown name is a usage error that lists the
valid ones). ``table`` is what a person reads (Rich tables and the usual lines); ``json`` and ``yaml`` are the
API's objects as they are (only the chosen fields with ``-c``); ``value`` prints bare values, one row per
line, separated by a tab (``openstack -f value``). The old ``--json`` flag still works (hidden): it is
``-o json``.

A command that lists or shows things::

    from kasou.cli.output import JSON, OUTPUT, Col, columns, render, view

    NET_COLS = [Col("name"), Col("vlan", "VLAN", text=lambda n: "-" if n["vlan"] is None else str(n["vlan"])),
                Col("description", hidden=True)]

    @network_app.command("list")
    def network_list(output: str = OUTPUT, column: list[str] = columns(NET_COLS), as_json: bool = JSON) -> None:
        v = view(output, column, as_json, NET_COLS)  # -o and -c checked before anything is asked or done
        render(client().get("/v1/networks"), NET_COLS, v)

``Col(key, header, text=..., value=...)``: ``key`` is what ``-c`` names and the field of the JSON object;
``header`` the table's heading; ``text(row)`` the table's cell (default: the field, ``-`` for none);
``value(row)`` what json/yaml/value print (default: the field); ``hidden`` columns are not in the table
unless asked for with ``-c``. :func:`render_one` shows one object (``human`` prints the usual lines in
table format); :func:`render` takes ``human`` too, for commands whose table is not one Rich table.

A command that starts a job (see :func:`act`)::

    @vm_app.command("start")
    def vm_start(name: str, wait: bool = WAIT, output: str = OUTPUT, column: list[str] = JOB_COLUMN,
                 as_json: bool = JSON) -> None:
        v = view(output, column, as_json, JOB_COLS)
        c = client()
        job = act(c, c.post(f"/v1/vms/{name}/actions/start")["job"], f"starting {name}", v, wait)
        if job is not None and v.human:  # it waited, and json/yaml/value/-c printed the job already
            say(f"vm {name}: {(job.get('result') or {}).get('state')}")

It waits by default with a progress bar; ``-o json`` prints the finished job; ``--no-wait`` prints the job
at once (``-o value``: its id alone). A job that fails exits with the code of its error.

Exit codes (:data:`EXIT_CODES`, :func:`exit_code`): 0 ok, 1 error, 2 usage (also input the API refuses as
invalid, HTTP 422), 3 not found (404), 4 conflict (409: exists, wrong state, no room), 5 timeout (504, a
job or a wait that did not end in time). Errors are mapped from kasou's one error tree through the API's
own HTTP mapping (:func:`kasou.wire.status_for`), by :class:`KasouGroup`, the root command group.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import typer
import yaml
from rich.table import Table
from typer.core import TyperGroup

from kasou.api.client import Client
from kasou.cli.common import err, follow, out, say
from kasou.errors import KasouError
from kasou.wire import status_for

FORMATS = ("table", "json", "yaml", "value")

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_NOT_FOUND, EXIT_CONFLICT, EXIT_TIMEOUT = range(6)
EXIT_CODES = {
    EXIT_OK: "ok",
    EXIT_ERROR: "error (the API unreachable, a refused token or permission, QEMU failed, ...)",
    EXIT_USAGE: "usage: a wrong option or argument, or input the API refused as invalid (HTTP 422)",
    EXIT_NOT_FOUND: "not found (HTTP 404): no such VM, job, host, ...",
    EXIT_CONFLICT: "conflict (HTTP 409): exists already, the wrong state, no room",
    EXIT_TIMEOUT: "timeout (HTTP 504): a job or a wait did not end in time",
}
_EXIT_BY_STATUS = {400: EXIT_USAGE, 422: EXIT_USAGE, 404: EXIT_NOT_FOUND, 409: EXIT_CONFLICT, 504: EXIT_TIMEOUT}

EPILOG = (
    "Output: -o table|json|yaml|value, -c COLUMN (repeat) on every command that prints data; actions wait "
    "(--no-wait: the job at once). Exit codes: "
    + "; ".join(f"{code} {text.split(':')[0].split(' (')[0]}" for code, text in EXIT_CODES.items())
    + ". See docs/cli.md."
)


def exit_code(e: KasouError) -> int:
    """The exit code of a kasou error: by the HTTP status the API gives it (one mapping, kasou.wire)."""
    return _EXIT_BY_STATUS.get(status_for(e), EXIT_ERROR)


class KasouGroup(TyperGroup):
    """The root group: a kasou error anywhere below is one line on stderr and its exit code.

    Its command groups (``vm``, ``backup``, ...) are imported when a command line names them (:data:`LAZY`,
    set by :mod:`kasou.cli.main`), so ``kasou vm show`` does not import the backup server's or the cluster set-up's
    modules (a third of the start-up time). Whoever walks the whole tree (manual pages, completion, tests) asks
    through ``list_commands``/``get_command``, as click's own help and completion do."""

    #: group name -> "module:attribute" of its Typer app ("" for a group added as it is), in the order
    #: ``kasou --help`` lists them (after the single commands)
    LAZY: ClassVar[dict[str, str]] = {}
    #: called with each group as it is loaded (completion: its name arguments complete from the API)
    on_load: ClassVar[Callable[[str, Any], Any] | None] = None

    def list_commands(self, ctx: Any) -> list[str]:
        return [*(n for n in super().list_commands(ctx) if n not in self.LAZY), *self.LAZY]

    def get_command(self, ctx: Any, cmd_name: str) -> Any:
        cmd = super().get_command(ctx, cmd_name)
        if cmd is None and self.LAZY.get(cmd_name):
            module, _, attr = self.LAZY[cmd_name].partition(":")
            # a group even with one command (kasou event list), as add_typer makes it; get_command would not
            cmd = typer.main.get_group(getattr(importlib.import_module(module), attr))
            cmd.name = cmd_name
            self.commands[cmd_name] = cmd
            if KasouGroup.on_load is not None:
                KasouGroup.on_load(cmd_name, cmd)
        return cmd

    def invoke(self, ctx: Any) -> Any:  # typer.Context: typer declares click's own
        try:
            return super().invoke(ctx)
        except KasouError as e:
            err.print(f"error: {e.message}", markup=False, highlight=False, soft_wrap=True)
            raise typer.Exit(exit_code(e)) from None


def subcommands(command: Any) -> list[tuple[str, Any]]:
    """A group's commands, lazy ones loaded (the whole tree: manual pages, completion, tests)."""
    if not hasattr(command, "commands"):
        return []
    ctx = typer.Context(command)
    return [(n, c) for n in command.list_commands(ctx) if (c := command.get_command(ctx, n)) is not None]


# -- the options ----------------------------------------------------------------------------------------

OUTPUT_HELP = "Output format: table (for people), json, yaml, or value (bare values, tab-separated, a row a line)."


def check_format(value: str | None) -> str | None:
    """``-o``'s check: one of :data:`FORMATS` (else a usage error, exit 2)."""
    if value is not None and value.lower() not in FORMATS:
        raise typer.BadParameter(f"{value!r} is not one of {', '.join(FORMATS)}", param_hint="'-o' / '--output'")
    return None if value is None else value.lower()


OUTPUT = typer.Option("table", "-o", "--output", metavar="FORMAT", help=OUTPUT_HELP, callback=check_format,
                      show_default=False)  # fmt: skip
COLUMN = typer.Option(None, "-c", "--column", metavar="COLUMN",
                      help="Only this column or field (repeat for more, in that order).")  # fmt: skip
JSON = typer.Option(False, "--json", hidden=True, help="The same as -o json.")
WAIT = typer.Option(True, "--wait/--no-wait", help="Wait for the job to end (--no-wait: print the job at once).")


@dataclass(frozen=True)
class Col:
    """One column of a table, one field of the JSON objects (see the module's docstring)."""

    key: str
    header: str | None = None
    text: Callable[[Any], str] | None = None
    value: Callable[[Any], Any] | None = None
    hidden: bool = False

    def get(self, row: Any) -> Any:
        return self.value(row) if self.value is not None else row.get(self.key) if isinstance(row, dict) else None

    def cell(self, row: Any) -> str:
        return self.text(row) if self.text is not None else text_of(self.get(row))


def cols(*keys: str, hidden: Iterable[str] = ()) -> list[Col]:
    """Plain columns by their keys (``hidden``: selectable with -c, not shown by default)."""
    return [Col(k) for k in keys] + [Col(k, hidden=True) for k in hidden]


def columns(cols: Sequence[Col]) -> Any:
    """The ``-c/--column`` option with the command's column names in its help."""
    names = ", ".join(c.key for c in cols)
    return typer.Option(None, "-c", "--column", metavar="COLUMN",
                        help=f"Only this column or field (repeat for more, in that order): {names}.")  # fmt: skip


@dataclass(frozen=True)
class View:
    """How a command prints: its format and the columns asked for (none: the defaults)."""

    format: str = "table"
    columns: tuple[str, ...] = ()

    @property
    def table(self) -> bool:
        return self.format == "table"

    @property
    def human(self) -> bool:
        """The table format with no column asked for: the command's usual lines for people."""
        return self.format == "table" and not self.columns

    def check(self, cols: Sequence[Col]) -> None:
        """An unknown column is a usage error (exit 2) that lists the valid ones."""
        known = [c.key for c in cols]
        bad = [c for c in self.columns if c not in known]
        if bad:
            raise typer.BadParameter(f"unknown column {bad[0]!r}; the columns are: {', '.join(known)}",
                                     param_hint="'-c' / '--column'")  # fmt: skip

    def pick(self, cols: Sequence[Col], default: Sequence[str] | None = None) -> list[Col]:
        self.check(cols)
        by = {c.key: c for c in cols}
        if self.columns:
            return [by[k] for k in self.columns]
        if default is not None:
            return [by[k] for k in default]
        return [c for c in cols if not c.hidden]


def view(output: str = "table", column: Iterable[str] | None = None, as_json: bool = False,
         cols: Sequence[Col] | None = None) -> View:  # fmt: skip
    """The command's :class:`View` from its options (``--json`` is ``-o json``); checks ``-c`` against ``cols``."""
    fmt = "json" if as_json else check_format(output or "table") or "table"
    names: list[str] = []
    for c in column or []:  # -c a,b is -c a -c b
        names += [x.strip() for x in c.split(",") if x.strip()]
    v = View(fmt, tuple(names))
    if cols is not None:
        v.check(cols)
    return v


# -- printing -------------------------------------------------------------------------------------------


def text_of(v: Any) -> str:
    """A value in a table cell: ``-`` for none, yes/no, lists joined."""
    if v is None or v == "":
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, list | tuple):
        return ", ".join(text_of(x) for x in v) or "-"
    if isinstance(v, dict):
        return json.dumps(v, separators=(",", ":"))
    return str(v)


def value_of(v: Any) -> str:
    """A bare value for ``-o value``: empty for none, lists comma-joined, objects as compact JSON."""
    if v is None:
        return ""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, list | tuple) and all(not isinstance(x, dict | list) for x in v):
        return ",".join(value_of(x) for x in v)
    if isinstance(v, dict | list | tuple):
        return json.dumps(v, separators=(",", ":"), ensure_ascii=False)
    return str(v).replace("\t", " ").replace("\n", " ")


def dump(data: Any, fmt: str) -> None:
    """JSON (indented, as ``--json`` always printed) or YAML, plain on stdout (no colours, no wrapping)."""
    if fmt == "yaml":
        sys.stdout.write(yaml.safe_dump(data, sort_keys=False, allow_unicode=True, default_flow_style=False))
    else:
        sys.stdout.write(json.dumps(data, indent=2, sort_keys=False, ensure_ascii=False) + "\n")


def render(
    rows: Sequence[Any], cols: Sequence[Col], v: View, *, human: Callable[[], None] | None = None,
    default: Sequence[str] | None = None, data: Any = None,
) -> None:  # fmt: skip
    """Print rows: a Rich table (or ``human()`` when no column was asked for), JSON/YAML, or bare values.

    ``default``: the columns ``-o value`` (and the table) show when none is asked for; ``data``: what json/yaml
    print when no column is asked for (default: the rows as they are)."""
    picked = v.pick(cols, default)
    if v.format in ("json", "yaml"):
        if v.columns:
            dump([{c.key: c.get(r) for c in picked} for r in rows], v.format)
        else:
            dump(list(rows) if data is None else data, v.format)
    elif v.format == "value":
        for r in rows:
            sys.stdout.write("\t".join(value_of(c.get(r)) for c in picked) + "\n")
    elif human is not None and not v.columns:
        human()
    else:
        t = Table(*[c.header or c.key for c in picked])
        for r in rows:
            t.add_row(*[c.cell(r) for c in picked])
        out.print(t)


def render_one(
    obj: Any, cols: Sequence[Col], v: View, *, human: Callable[[], None] | None = None,
    default: Sequence[str] | None = None, data: Any = None,
) -> None:  # fmt: skip
    """Print one object: ``human()`` (or ``field  value`` lines), JSON/YAML, or its values one a line."""
    picked = v.pick(cols, default)
    if v.format in ("json", "yaml"):
        dump({c.key: c.get(obj) for c in picked} if v.columns else (obj if data is None else data), v.format)
    elif v.format == "value":
        for c in picked:
            sys.stdout.write(value_of(c.get(obj)) + "\n")
    elif human is not None and not v.columns:
        human()
    else:
        width = max((len(c.header or c.key) for c in picked), default=0)
        for c in picked:
            say(f"{c.header or c.key:{width}}  {c.cell(obj)}")


# -- jobs -----------------------------------------------------------------------------------------------


def _error_text(j: dict[str, Any]) -> str:
    return str((j.get("error") or {}).get("message") or "")


def _progress_text(j: dict[str, Any]) -> str:
    return f"{float(j.get('progress') or 0) * 100:.0f}%"


JOB_COLS = [
    Col("id"),
    Col("kind"),
    Col("vm"),
    Col("state"),
    Col("progress", text=_progress_text),
    Col("step"),
    Col("error", value=lambda j: j.get("error"), text=lambda j: _error_text(j) or "-"),
    Col("result", hidden=True),
    Col("department", hidden=True),
    Col("created_at", hidden=True),
    Col("started_at", hidden=True),
    Col("finished_at", hidden=True),
]
JOB_COLUMN = columns(JOB_COLS)


def act(
    c: Client, job: dict[str, Any], title: str, v: View, wait: bool = True, *, timeout: float = 900,
    queued: Callable[[dict[str, Any]], str] | None = None,
) -> dict[str, Any] | None:  # fmt: skip
    """Follow a job the API accepted: a progress bar while it runs (on stderr unless the table format).

    Returns the finished job, or None with ``--no-wait``. Unless ``v.human`` (the table format, no -c: the
    command then says what happened in its own words), it prints the job itself: the finished one, or with
    ``--no-wait`` the job at once (``-o value``: its id alone; the table format: ``queued(job)``, by default
    ``TITLE: job ID``). A job that failed raises its error (its exit code); -o json/yaml print it first."""
    if not wait:
        if v.human:
            say(queued(job) if queued is not None else f"{title}: job {job['id']}")
        else:
            render_one(job, JOB_COLS, v, default=["id"])
        return None
    try:
        done = follow(c, job, title, timeout=timeout, console=out if v.table else err)
    except KasouError:
        if v.format in ("json", "yaml"):
            with contextlib.suppress(KasouError):  # the job's own error is the one to report
                render_one(c.get(f"/v1/jobs/{job['id']}"), JOB_COLS, v)
        raise
    if not v.human:
        render_one(done, JOB_COLS, v, default=["id"])
    return done
