"""What every ``kasou`` command module shares: the API client, the consoles, progress bars.

Formats (-o/-c), jobs (wait, --no-wait) and exit codes: :mod:`kasou.cli.output`.

Sub-apps (``kasou pool``, ``kasou disk``, ...) live in modules of their own and import these;
:mod:`kasou.cli.main` adds them with ``app.add_typer``.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, NoReturn

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from kasou.api.auth import read_token
from kasou.api.client import Client
from kasou.config import Paths, api_url
from kasou.errors import InvalidSpec
from kasou.tlsctx import trust

out = Console(emoji=False)  # ":ab:" in a fingerprint or a path is text, not an emoji
err = Console(stderr=True, emoji=False)

# Tests may swap the client factory (to talk to an in-process app): kasou.cli.common.client_factory
client_factory: Callable[[], Client] | None = None


def fail(message: str, code: int = 1) -> NoReturn:
    """One line on stderr and the exit code (kasou.cli.output's EXIT_*: 2 for usage, ...)."""
    err.print(f"error: {message}", markup=False, highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def client(timeout: float = 30.0) -> Client:
    if client_factory is not None:
        return client_factory()
    paths = Paths.from_env()
    # https: the server is verified with the site CA (KASOU_CA or the home's tls/ca.crt), else the system's CAs
    return Client(api_url(), read_token(paths.token_file), verify=trust(paths.tls_files()), timeout=timeout)


def print_json(data: Any) -> None:
    """JSON on stdout, plain. A command's data goes through :func:`kasou.cli.output.render` instead (-o, -c)."""
    # Plain print: machine output must not be wrapped or coloured.
    sys.stdout.write(json.dumps(data, indent=2, sort_keys=False) + "\n")


@contextmanager
def progress_bar(title: str, console: Console | None = None) -> Iterator[Callable[[float, str], None]]:
    """A progress bar on a terminal (``console``: stdout's by default); nothing when it is piped."""
    console = console or out
    if not console.is_terminal:
        yield lambda _f, _s: None
        return
    with Progress(
        TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[step]}"), TimeElapsedColumn(),
        console=console, transient=True,
    ) as bar:  # fmt: skip
        task = bar.add_task(title, total=1.0, step="")

        def update(fraction: float, step: str) -> None:
            bar.update(task, completed=fraction, step=step)

        yield update


def follow(
    c: Client, job: dict[str, Any], title: str, timeout: float = 900, console: Console | None = None
) -> dict[str, Any]:
    """Wait for a job with a progress bar; its error (:mod:`kasou.errors`) if it failed or did not end in time."""
    with progress_bar(title, console) as update:
        return c.wait_job(job["id"], timeout, lambda j: update(j.get("progress", 0.0), j.get("step", "")))


def parse_int(value: str, what: str) -> int:
    try:
        return int(value.strip())
    except (ValueError, AttributeError):
        raise InvalidSpec(f"{what} must be a whole number, not {value!r}", field=what) from None


def say(line: str) -> None:
    """One plain line of output (no markup, no highlighting, not wrapped: scripts read it)."""
    out.print(line, markup=False, highlight=False, soft_wrap=True)


def read_text_file(path: str, what: str, limit: int = 1024 * 1024) -> str:
    """A small text file named on the command line, or a one-line failure."""
    try:
        with open(path, "rb") as f:
            data = f.read(limit + 1)
    except OSError as e:
        fail(f"{what} {path}: {e.strerror}")
    if len(data) > limit:
        fail(f"{what} {path}: larger than {limit // 1024} KiB")
    try:
        return data.decode()
    except UnicodeDecodeError:
        fail(f"{what} {path}: not a text file (UTF-8)")


def uptime_text(s: float | None) -> str:
    """A guest's uptime as ``[Nd ]HH:MM:SS`` (``-`` when unknown)."""
    if s is None:
        return "-"
    s = int(s)
    d, s = divmod(s, 86400)
    h, s = divmod(s, 3600)
    m, s = divmod(s, 60)
    return (f"{d}d " if d else "") + f"{h:02d}:{m:02d}:{s:02d}"
