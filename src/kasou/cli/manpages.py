"""Manual pages generated from the command line itself: ``kasou man --out DIR`` writes ``kasou.1`` and one page per
command group and command (``kasou-vm.1``, ``kasou-vm-start.1``, ...), as git does, so ``man kasou-vm-start``
says exactly what ``kasou vm start --help`` says, with the same options and defaults.

::

    kasou man --out /usr/local/share/man/man1 && mandb -q
    man kasou-backup-policy-set
"""

from __future__ import annotations

import datetime
import re
from pathlib import Path
from typing import Any

import typer
import typer.main

from kasou import __version__
from kasou.cli.output import subcommands

SECTION = "1"


def _is(p: Any, kind: str) -> bool:
    """An argument or an option of Typer's command tree (its own copy of Click: duck-typed)."""
    return getattr(p, "param_type_name", None) == kind


def _is_group(command: Any) -> bool:
    return hasattr(command, "commands")


def _roff(text: str) -> str:
    """Text as roff: backslashes doubled, a line starting with a dot or quote escaped."""
    text = text.replace("\\", "\\e").replace("-", "\\-")
    return "\n".join(("\\&" + ln) if ln.startswith((".", "'")) else ln for ln in text.splitlines())


def _help(command: Any) -> str:
    text = command.help or command.short_help or ""
    return re.sub(r"\n\s*\n", "\n.PP\n", _roff(text.strip()))


def _page_name(path: tuple[str, ...]) -> str:
    return "-".join(path)


def _synopsis(path: tuple[str, ...], command: Any, ctx: Any) -> str:
    args = " ".join(" ".join(p.get_usage_pieces(ctx)) or str(p.name).upper() for p in command.params
                    if _is(p, "argument"))  # fmt: skip
    tail = " COMMAND [ARGS]..." if _is_group(command) else ""
    return _roff(f"{' '.join(path)} [OPTIONS]{tail} {args}".rstrip())


def _option(p: Any, ctx: Any) -> str:
    """An argument or option as ``--help`` shows it: its names and metavar, its help and default."""
    record = p.get_help_record(ctx)
    names, text = (record[0], record[1]) if record else (", ".join(p.opts), "")
    return "\n".join([".TP", f"\\fB{_roff(names)}\\fR", _roff(" ".join(text.split())) or "\\&"])


def page(path: tuple[str, ...], command: Any, date: str) -> str:
    """The manual page of the command at ``path`` (e.g. ``("kasou", "vm", "start")``)."""
    name = _page_name(path)
    ctx = typer.Context(command, info_name=" ".join(path))
    lines = [
        f'.TH "{name.upper()}" "{SECTION}" "{date}" "kasou {__version__}" "kasou Manual"',
        ".SH NAME",
        f"{_roff(name)} \\- {_roff((command.get_short_help_str(200) or name).strip())}",
        ".SH SYNOPSIS",
        f"\\fB{_synopsis(path, command, ctx)}\\fR",
        ".SH DESCRIPTION",
        _help(command) or "\\&",
    ]
    args = [p for p in command.params if _is(p, "argument")]
    if args:
        lines.append(".SH ARGUMENTS")
        lines += [_option(a, ctx) for a in args]
    opts = [p for p in command.params if _is(p, "option") and not p.hidden]
    if opts:
        lines.append(".SH OPTIONS")
        lines += [_option(p, ctx) for p in opts]
    if _is_group(command):
        lines.append(".SH COMMANDS")
        for sub_name, sub in sorted(subcommands(command)):
            if sub.hidden:
                continue
            lines += [".TP", f"\\fB{_roff(sub_name)}\\fR", _roff(sub.get_short_help_str(200)) or "\\&"]
    see = [f"{_page_name(path[:-1])}({SECTION})"] if len(path) > 1 else []
    if _is_group(command):
        see += [f"{_page_name((*path, n))}({SECTION})" for n, c in sorted(subcommands(command)) if not c.hidden]
    if see:
        lines += [".SH SEE ALSO", _roff(", ".join(see))]
    return "\n".join(lines) + "\n"


def pages(app: typer.Typer, date: str | None = None) -> dict[str, str]:
    """Every page of the command line, by file name (``kasou-vm-start.1``)."""
    when = date or datetime.date.today().isoformat()
    out: dict[str, str] = {}

    def walk(path: tuple[str, ...], command: Any) -> None:
        out[f"{_page_name(path)}.{SECTION}"] = page(path, command, when)
        if _is_group(command):
            for n, sub in subcommands(command):
                if not sub.hidden:
                    walk((*path, n), sub)

    walk(("kasou",), typer.main.get_command(app))
    return out


def write(app: typer.Typer, directory: Path) -> int:
    """Write every page into ``directory``; how many."""
    directory.mkdir(parents=True, exist_ok=True)
    written = pages(app)
    for name, text in written.items():
        (directory / name).write_text(text, encoding="utf-8")
    return len(written)
