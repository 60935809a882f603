"""``kasou vm console NAME``: a terminal on a VM's serial console, and ``kasou vm log --follow``.

The console goes through the API (a one-time ticket of kind ``serial``, then its websocket; the API
checks the right and writes ``console_open``/``console_close`` to the audit chain) to the agent of the
VM's host, which connects to QEMU's serial socket. On a terminal, keys go to the guest as typed (raw
mode) until the escape key, Ctrl-] as with telnet and virsh; the terminal is restored however it ends.
Without a terminal (a script), standard input is sent as it comes and the console ends ``--linger``
seconds after it is exhausted (what the guest answers meanwhile is shown), or after ``--timeout``.
"""

from __future__ import annotations

import contextlib
import os
import select
import sys
import termios
import threading
import time
import tty
from typing import Any

import typer

from kasou.cli.common import client, err, fail

ESCAPE = b"\x1d"  # Ctrl-]
READ_EVERY_S = 0.2
LOG_POLL_S = 0.5
LOG_TAIL_BYTES = 65536
ANCHOR = 256  # the last characters of what was shown: where the next poll of the log goes on


def console(name: str, linger: float = 2.0, timeout: float | None = None) -> None:
    c = client()
    ticket = c.post(f"/v1/vms/{name}/console-ticket", params={"kind": "serial"})
    interactive = sys.stdin.isatty()
    end = None if timeout is None else time.monotonic() + timeout
    with c.websocket(ticket["url"]) as ws:
        if interactive:
            err.print(f"connected to the serial console of {name}; escape: Ctrl-]", markup=False, highlight=False)
        closed = threading.Event()
        reader = threading.Thread(target=_to_stdout, args=(ws, closed), daemon=True)
        reader.start()
        fd = sys.stdin.fileno()
        saved = termios.tcgetattr(fd) if interactive else None
        why = ""
        try:
            if saved is not None:
                tty.setraw(fd)
            why = _from_stdin(ws, fd, closed, linger, end, interactive)
        finally:
            if saved is not None:
                termios.tcsetattr(fd, termios.TCSADRAIN, saved)
            with contextlib.suppress(Exception):
                ws.close()
            reader.join(timeout=2.0)
    if interactive or why:
        err.print(f"\nserial console of {name} closed{f': {why}' if why else ''}", markup=False, highlight=False)


def _from_stdin(ws: Any, fd: int, closed: threading.Event, linger: float,
                end: float | None, interactive: bool) -> str:  # fmt: skip
    """Keys to the guest until the escape key, end of input (and quiet), the deadline or the console closing."""
    input_ended: float | None = None
    while not closed.is_set():
        now = time.monotonic()
        if end is not None and now >= end:
            return ""
        if input_ended is not None and now - input_ended >= linger:
            return ""
        if input_ended is not None:
            time.sleep(READ_EVERY_S)
            continue
        ready, _, _ = select.select([fd], [], [], READ_EVERY_S)
        if not ready:
            continue
        data = os.read(fd, 4096)
        if not data:
            input_ended = time.monotonic()  # what the guest answers meanwhile is shown
            continue
        if interactive and ESCAPE in data:
            data = data[: data.index(ESCAPE)]
            if data:
                ws.send_bytes(data)
            return ""
        ws.send_bytes(data)
    return "the console was closed by kasou (the VM stopped, the session ended, or it was idle too long)"


def _to_stdout(ws: Any, closed: threading.Event) -> None:
    from httpx_ws import WebSocketDisconnect, WebSocketNetworkError  # here: the other commands start faster

    out = sys.stdout.buffer
    try:
        while True:
            data = ws.receive_bytes()
            out.write(data)
            out.flush()
    except (WebSocketDisconnect, WebSocketNetworkError, OSError, RuntimeError):
        pass
    except Exception:
        pass
    finally:
        closed.set()


def follow_log(name: str, max_bytes: int, timeout: float | None = None) -> None:
    """``vm log --follow``: the end of the log, then what the guest writes, until Ctrl-C (or ``timeout``)."""
    c = client()
    shown = c.text(f"/v1/vms/{name}/console", params={"max_bytes": max_bytes})
    sys.stdout.write(shown)
    sys.stdout.flush()
    end = None if timeout is None else time.monotonic() + timeout
    with contextlib.suppress(KeyboardInterrupt):
        while end is None or time.monotonic() < end:
            time.sleep(LOG_POLL_S)
            cur = c.text(f"/v1/vms/{name}/console", params={"max_bytes": LOG_TAIL_BYTES})
            new = new_part(shown, cur)
            if new:
                sys.stdout.write(new)
                sys.stdout.flush()
                shown = cur
            elif len(cur) < len(shown):
                shown = cur  # the log began again (the VM started anew) and holds nothing new yet


def new_part(shown: str, cur: str) -> str:
    """What ``cur`` (the log's end now) has after what was ``shown`` (its end before)."""
    if not shown:
        return cur
    if cur.startswith(shown):
        return cur[len(shown) :]
    anchor = shown[-ANCHOR:]
    at = cur.rfind(anchor)
    if at >= 0:
        return cur[at + len(anchor) :]
    return cur if cur != shown else ""  # the window moved past it (or the log began again): all of it


def register(vm_app: typer.Typer) -> None:
    @vm_app.command("console")
    def vm_console(
        name: str,
        linger: float = typer.Option(
            2.0, "--linger", help="Without a terminal: seconds to show the guest's answers after the input ends."
        ),
        timeout: float = typer.Option(None, "--timeout", help="Close after this many seconds."),
    ) -> None:
        """A terminal on the VM's serial console (escape: Ctrl-]); audited like the web console."""
        if timeout is not None and timeout <= 0:
            fail("--timeout must be more than 0 seconds")
        console(name, linger, timeout)
