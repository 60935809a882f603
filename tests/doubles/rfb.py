"""A tiny RFB (VNC) server on a unix socket, for the fake driver's VMs in functional tests.

It speaks just enough of RFB 3.8 for a client to get through the handshake (security type None,
a 64x48 true-colour screen) and keeps every byte a client sends after the handshake, so a test can
see what the console proxy let through. A FramebufferUpdateRequest gets one raw rectangle.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
from pathlib import Path

WIDTH, HEIGHT = 64, 48
PIXEL_FORMAT = struct.pack(">BBBBHHHBBB3x", 32, 24, 0, 1, 255, 255, 255, 16, 8, 0)


class FakeRfbServer:
    """One VM's display: serves every client that connects to ``path`` until :meth:`close`."""

    def __init__(self, path: Path, name: str) -> None:
        self.path = path
        self.name = name
        self.received = bytearray()  # what clients sent after their handshake, in order
        self.clients = 0
        self._server: asyncio.AbstractServer | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        self._server = await asyncio.start_unix_server(self._serve, path=str(self.path))

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        self.clients += 1
        try:
            writer.write(b"RFB 003.008\n")
            await reader.readexactly(12)  # the client's version
            writer.write(b"\x01\x01")  # one security type: None
            await reader.readexactly(1)
            writer.write(b"\x00\x00\x00\x00")  # security result: OK
            await reader.readexactly(1)  # ClientInit (shared flag)
            name = self.name.encode()
            writer.write(struct.pack(">HH", WIDTH, HEIGHT) + PIXEL_FORMAT + struct.pack(">I", len(name)) + name)
            await writer.drain()
            while True:
                data = await reader.read(65536)
                if not data:
                    break
                self.received += data
                # A FramebufferUpdateRequest (10 bytes, first or last in what arrived): a raw rectangle of the screen.
                if data[:1] == b"\x03" or (len(data) >= 10 and data[-10] == 3):
                    rect = struct.pack(">HHHHi", 0, 0, WIDTH, HEIGHT, 0) + b"\x40\x80\xc0\x00" * WIDTH * HEIGHT
                    writer.write(struct.pack(">BxH", 0, 1) + rect)
                    await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()
            if task is not None:
                self._tasks.discard(task)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        for t in list(self._tasks):
            t.cancel()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
