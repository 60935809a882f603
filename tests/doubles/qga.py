"""A fake QEMU guest agent on a unix socket: what ``qemu-ga`` answers on its virtio-serial port.

It speaks the same JSON lines: a raw 0xFF byte resets its parser, ``guest-sync-delimited`` is answered
with 0xFF and the id, and ``guest-shutdown`` has no answer. ``silent`` makes it a guest without an agent:
the connection is accepted and nothing ever comes back (what QEMU does when no agent runs in the guest).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
from pathlib import Path
from typing import Any


class FakeGuestAgent:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.silent = False
        self.stale: bytes = b""  # written to each new connection first (an earlier client's leftovers)
        self.frozen = False
        self.freeze_delay_s = 0.0
        self.fail: dict[str, str] = {}  # command -> error description
        self.commands: list[str] = []
        self.shutdowns = 0
        self.hostname = "emr-db1"
        # guest-exec: program -> (exit code, stdout, stderr); a program not listed is not found in the guest
        self.programs: dict[str, tuple[int, bytes, bytes]] = {"/bin/true": (0, b"", b"")}
        self.runs: dict[int, tuple[str, list[str], int]] = {}  # pid -> (program, args, status polls left)
        self.exec_polls = 1  # guest-exec-status answers "still running" this many times first
        self.interfaces: list[dict[str, Any]] = [
            {"name": "lo", "ip-addresses": [{"ip-address-type": "ipv4", "ip-address": "127.0.0.1", "prefix": 8}]},
            {"name": "ens3", "ip-addresses": [
                {"ip-address-type": "ipv4", "ip-address": "10.0.2.15", "prefix": 24},
                {"ip-address-type": "ipv6", "ip-address": "fe80::5054:ff:fe12:3456", "prefix": 64},
            ]},
        ]  # fmt: skip
        self._server: asyncio.Server | None = None
        self._conns: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> FakeGuestAgent:
        self._server = await asyncio.start_unix_server(self._serve, path=str(self.path))
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for t in list(self._conns):
            t.cancel()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._server.wait_closed(), 2.0)
        self.path.unlink(missing_ok=True)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._conns.add(task)
        try:
            if self.stale:
                writer.write(self.stale)
            buf = b""
            while True:
                chunk = await reader.read(4096)
                if not chunk:
                    return
                buf += chunk
                if b"\xff" in buf:  # the parser drops what it held
                    buf = buf.rsplit(b"\xff", 1)[1]
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    if self.silent:
                        continue
                    out = await self._answer(json.loads(line))
                    if out is not None:
                        writer.write(out)
                        await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            self._conns.discard(task)
            writer.close()

    async def _answer(self, msg: dict[str, Any]) -> bytes | None:
        cmd = msg.get("execute", "")
        self.commands.append(cmd)
        if cmd in self.fail:
            return _reply({"error": {"class": "GenericError", "desc": self.fail[cmd]}})
        if cmd == "guest-sync-delimited":
            return b"\xff" + _reply({"return": msg["arguments"]["id"]})
        if cmd == "guest-ping":
            return _reply({"return": {}})
        if cmd == "guest-get-osinfo":
            return _reply({"return": {"id": "debian", "pretty-name": "Debian GNU/Linux 12 (bookworm)"}})
        if cmd == "guest-get-host-name":
            return _reply({"return": {"host-name": self.hostname}})
        if cmd == "guest-network-get-interfaces":
            return _reply({"return": self.interfaces})
        if cmd == "guest-shutdown":
            self.shutdowns += 1
            return None
        if cmd == "guest-fsfreeze-freeze":
            await asyncio.sleep(self.freeze_delay_s)
            self.frozen = True
            return _reply({"return": 1})
        if cmd == "guest-fsfreeze-thaw":
            was, self.frozen = self.frozen, False
            return _reply({"return": 1 if was else 0})
        if cmd == "guest-exec":
            path, args = msg["arguments"]["path"], list(msg["arguments"].get("arg", []))
            if path not in self.programs:
                return _reply({"error": {"class": "GenericError", "desc": f"Guest agent command failed, error was "
                                                                          f"'Failed to execute child process “{path}” "
                                                                          f"(No such file or directory)'"}})  # fmt: skip
            pid = 1000 + len(self.runs)
            self.runs[pid] = (path, args, self.exec_polls)
            return _reply({"return": {"pid": pid}})
        if cmd == "guest-exec-status":
            pid = int(msg["arguments"]["pid"])
            path, args, left = self.runs[pid]
            if left > 0:
                self.runs[pid] = (path, args, left - 1)
                return _reply({"return": {"exited": False}})
            code, out, err = self.programs[path]
            return _reply({"return": {"exited": True, "exitcode": code, "out-data": base64.b64encode(out).decode(),
                                      "err-data": base64.b64encode(err).decode()}})  # fmt: skip
        if cmd == "guest-fsfreeze-status":
            return _reply({"return": "frozen" if self.frozen else "thawed"})
        return _reply({"error": {"class": "CommandNotFound", "desc": f"command {cmd} not found"}})


def _reply(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj).encode() + b"\n"
