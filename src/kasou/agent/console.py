"""The agent's side of the consoles: websockets that carry a VM's VNC display (RFB bytes) and its serial console.

``/agent/v1/vms/{name}/vnc`` connects to the VM's VNC unix socket on this host (the driver says
where) and pipes bytes both ways until either side ends, the connection stays idle for
``KASOU_CONSOLE_IDLE`` seconds, or the agent stops. Only the control plane reaches the agent (a
root-only unix socket on one host, the cluster network otherwise); the API server checks who may
open which console before it connects here (kasou.api.console).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from pathlib import Path

from fastapi import FastAPI, WebSocket, WebSocketDisconnect

from kasou.config import console_idle_s
from kasou.hypervisor.base import Driver

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 5.0
READ_CHUNK = 64 * 1024  # one websocket message carries at most this much of the display stream
#: Close codes (RFC 6455 private range): the VM has no display here, or it did not answer.
NO_DISPLAY = 4404
DISPLAY_UNREACHABLE = 4502
IN_USE = 4409  # the serial console takes one terminal at a time


async def pipe_socket(ws: WebSocket, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Bytes from the websocket to the socket and back, until one side ends or it stays idle too long."""
    last = time.monotonic()
    idle = console_idle_s()

    async def up() -> None:
        nonlocal last
        while True:
            msg = await ws.receive()
            if msg["type"] == "websocket.disconnect":
                return
            data = msg.get("bytes") or (msg.get("text") or "").encode()
            if data:
                last = time.monotonic()
                writer.write(data)
                await writer.drain()

    async def down() -> None:
        nonlocal last
        while True:
            data = await reader.read(READ_CHUNK)
            if not data:
                return
            last = time.monotonic()
            await ws.send_bytes(data)

    async def watch() -> None:
        while time.monotonic() - last < idle:
            await asyncio.sleep(min(5.0, idle / 4))

    tasks = [asyncio.create_task(c) for c in (up(), down(), watch())]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError, WebSocketDisconnect, ConnectionError, RuntimeError):
                await t
        writer.close()
        with contextlib.suppress(ConnectionError, OSError):
            await asyncio.wait_for(writer.wait_closed(), 2.0)


async def proxy(ws: WebSocket, name: str, path: Path, what: str) -> None:
    """Connect to the VM's socket ``path`` (bounded) and pipe it to the accepted websocket until either ends."""
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_unix_connection(str(path)), CONNECT_TIMEOUT_S)
    except (OSError, TimeoutError) as e:
        await ws.close(DISPLAY_UNREACHABLE, f"the {what} of VM {name} does not answer: {e}"[:120])
        return
    log.info("%s of %s opened", what, name)
    try:
        await pipe_socket(ws, reader, writer)
    finally:
        with contextlib.suppress(RuntimeError, WebSocketDisconnect):
            await ws.close()
        log.info("%s of %s closed", what, name)


def add_console_routes(app: FastAPI, driver: Driver) -> None:
    serial_in_use: set[str] = set()

    @app.websocket("/agent/v1/vms/{name}/serial")
    async def serial(ws: WebSocket, name: str) -> None:
        """The VM's serial console as a websocket of binary messages (the bytes of its first serial port).

        QEMU's console socket serves one client at a time: a second terminal is refused while one is open."""
        await ws.accept()
        path = await driver.serial_socket(name)
        if path is None:
            await ws.close(NO_DISPLAY, f"VM {name} has no serial console on this host (is it running?)"[:120])
            return
        if name in serial_in_use:
            await ws.close(IN_USE, f"the serial console of VM {name} is in use by another terminal"[:120])
            return
        serial_in_use.add(name)
        try:
            await proxy(ws, name, path, "serial console")
        finally:
            serial_in_use.discard(name)

    @app.websocket("/agent/v1/vms/{name}/vnc")
    async def vnc(ws: WebSocket, name: str) -> None:
        """The VM's VNC display as a websocket of binary messages (RFB as QEMU speaks it)."""
        await ws.accept()
        path = await driver.vnc_socket(name)
        if path is None:
            await ws.close(NO_DISPLAY, f"VM {name} has no display on this host (is it running?)"[:120])
            return
        await proxy(ws, name, path, "display")
