"""``kasou config``: the settings in effect and where each came from (``show``), and a check of them (``check``).

The settings are read as the services read them: the environment (``KASOU_*``), then the file (``KASOU_CONFIG``,
else /etc/kasou/kasou.toml), then the defaults (docs/configuration.md). Secrets are masked.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import typer

from kasou import config, settings
from kasou.cli.common import err, say
from kasou.cli.output import JSON, OUTPUT, Col, columns, dump, render, view
from kasou.errors import KasouError
from kasou.settings import reference

config_app = typer.Typer(help="The settings: what is in effect, and a check of them.", no_args_is_help=True)

MASK = "********"


def _derived() -> dict[str, Any]:
    """The values a key takes when it is not set and its default is made from another (HOME/backups ...)."""
    paths = config.Paths.from_env()
    tls = paths.tls_files()
    makers = {
        "api.token_file": lambda: paths.token_file,
        "paths.transfer_dir": lambda: paths.transfer,
        "backup.dir": lambda: paths.backups,
        "recording.dir": config.recordings_dir,
        "tls.dir": lambda: paths.tls_dir,
        "tls.ca": lambda: tls.ca,
        "tls.cert": lambda: tls.cert,
        "tls.key": lambda: tls.key,
        "host.name": config.host_name,
    }
    return {k: str(make()) for k, make in makers.items()}


def _masked(key: settings.Key, value: Any) -> Any:
    if not key.secret or value in (None, "", []):
        return value
    if isinstance(value, str) and "://" in value:  # a URL: its scheme and host are no secret, the rest may be
        scheme, rest = value.split("://", 1)
        return f"{scheme}://{rest.split('/', 1)[0]}/{MASK}"
    return MASK


def _rows(loaded: settings.Loaded) -> list[dict[str, Any]]:
    try:
        derived = _derived()
    except KasouError:  # a bad path setting: the rows show it
        derived = {}
    rows = []
    for key in settings.KEYS:
        origin = loaded.origin(key.dotted)
        error = loaded.errors.get(key.dotted)
        if error is not None:
            value = loaded.raw[key.dotted]
        else:
            value = getattr(getattr(loaded.settings, key.section), key.name)
            if value is None and key.dotted in derived:
                value = derived[key.dotted]
        rows.append({
            "key": key.dotted, "env": key.env, "value": _masked(key, value), "source": origin.source,
            "from": origin.where or None, "default": key.default_text(),
            "error": error.message if error is not None else None,
        })  # fmt: skip
    return rows


def _load(file: Path | None) -> settings.Loaded:
    if file is None:
        return settings.current()
    return settings.load(dict(os.environ), file, True)


def _value_text(r: dict[str, Any]) -> str:
    return settings.show(r["value"]) if r["value"] not in (None, []) else "none"


SETTING_COLS = [
    Col("key"), Col("value", text=_value_text), Col("source"), Col("from"),
    Col("env", hidden=True), Col("default", hidden=True), Col("error", hidden=True),
]  # fmt: skip


@config_app.command("show")
def show(
    file: Path = typer.Option(None, "--file", help="Read this settings file instead of KASOU_CONFIG's."),
    output: str = OUTPUT,
    column: list[str] = columns(SETTING_COLS),
    as_json: bool = JSON,
) -> None:
    """Every setting in effect, and where it came from: default, the file, or the environment (secrets masked).
    -o json|yaml: the file, every setting and the problems; -c: the settings' columns."""
    v = view(output, column, as_json, SETTING_COLS)
    loaded = _load(file)
    rows = _rows(loaded)
    problems = [p.message for p in loaded.problems()]
    if v.format in ("json", "yaml") and not v.columns:
        dump({"file": str(loaded.file), "file_state": loaded.file_state, "settings": rows, "problems": problems},
             v.format)  # fmt: skip
    elif not v.human:
        render(rows, SETTING_COLS, v)
    else:
        say(f"settings file: {loaded.file} ({loaded.file_state})")
        width = max(len(r["key"]) for r in rows)
        values = [settings.show(r["value"]) if r["value"] not in (None, []) else "none" for r in rows]
        vwidth = min(40, max(len(v) for v in values))
        for r, value in zip(rows, values, strict=True):
            where = "default" if r["source"] == "default" else f"{r['source']} {r['from']}"
            flag = "  NOT ALLOWED" if r["error"] else ""
            say(f"{r['key']:<{width}}  {value:<{vwidth}}  [{where}]{flag}")
    for line in problems:
        err.print(f"error: {line}", markup=False, highlight=False, soft_wrap=True)
    if problems:
        raise typer.Exit(1)


@config_app.command("check")
def check(
    file: Path = typer.Option(None, "--file", help="Check this file (with the environment) instead of KASOU_CONFIG's."),
) -> None:
    """Check the settings as the services would read them: exit 0, or 1 with one line per bad key (the key, its
    value, what is allowed), unknown name or unreadable file."""
    loaded = _load(file)
    problems = loaded.problems()
    for p in problems:
        err.print(f"error: {p.message}", markup=False, highlight=False, soft_wrap=True)
    if problems:
        raise typer.Exit(1)
    from_file = sum(1 for k in settings.KEYS if loaded.origin(k.dotted).source == "file")
    from_env = sum(1 for k in settings.KEYS if loaded.origin(k.dotted).source == "environment")
    say(f"settings OK: {loaded.file} ({loaded.file_state}); {from_file} from the file, {from_env} from the environment")


@config_app.command("example")
def example() -> None:
    """Print a commented settings file with every key and its default (the package installs it as
    /etc/kasou/kasou.toml): kasou config example > kasou.toml"""
    sys.stdout.write(reference.example_file())
