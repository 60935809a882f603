"""A small, bounded client for the QEMU guest agent (``qemu-ga`` inside the guest).

The guest agent speaks JSON lines over the virtio-serial port ``org.qemu.guest_agent.0``; QEMU
gives the host end as a unix socket in the VM's run directory (``qga.sock``, see cmdline.py).
The qemu.qmp package does not fit: it expects QMP's greeting and capability negotiation, and the
guest agent has neither. What the protocol needs (QEMU's ``qga/qapi-schema.json``):

* A connection may hold leftovers: half a command an earlier client wrote, or answers to it that
  nobody read. ``guest-sync-delimited`` resynchronises: the client first writes a raw 0xFF byte
  (the agent's JSON parser drops whatever it held), then the command with a fresh id; the agent
  answers with 0xFF and then ``{"return": id}``. Everything before that answer is stale.
* A guest without an agent (or whose agent is not running yet) never answers at all: QEMU accepts
  the connection and the bytes wait in the port. So every call here has a timeout, and after a
  timeout the connection is dropped (the next call connects and resynchronises afresh).
* ``guest-shutdown`` has no answer on success (the guest is going down).

One :class:`GuestAgent` per VM; its lock keeps one exchange at a time on the one connection (the
poller and a snapshot's freeze share it).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import ipaddress
import itertools
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from kasou.errors import GuestAgentError, OperationTimeout

CALL_TIMEOUT_S = 3.0  # an agent that answers does so in milliseconds; 3 s allows a busy TCG guest
FREEZE_TIMEOUT_S = 20.0  # fsfreeze flushes every file system first: it can take seconds under load
THAW_TIMEOUT_S = 10.0
THAW_TRIES = 3  # a guest must never be left frozen: thaw is tried again (each bounded) before giving up
SHUTDOWN_ERROR_WAIT_S = 1.0  # guest-shutdown answers only on failure: wait this long for an error
MAX_LINE = 1 << 20  # an answer longer than this is refused (network interfaces of a big guest fit)
SENTINEL = b"\xff"

Consistency = Literal["application", "crash", "memory"]
#: Freezes a guest around a point in time: yields a one-element list the body reads (application or crash).
Quiesce = Callable[[], contextlib.AbstractAsyncContextManager[list[Consistency]]]

log = logging.getLogger(__name__)

_ids = itertools.count(int(time.time()) % 100_000 * 1000)


class GuestAgent:
    """The host end of one VM's guest agent channel."""

    def __init__(self, path: Path, timeout_s: float = CALL_TIMEOUT_S) -> None:
        self.path = path
        self.timeout_s = timeout_s
        self.lock = asyncio.Lock()
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def close(self) -> None:
        writer, self._reader, self._writer = self._writer, None, None
        if writer is not None:
            writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.wait_closed(), 1.0)

    async def _open(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """Connect and resynchronise (guest-sync-delimited); the caller bounds the time."""
        if self._reader is not None and self._writer is not None:
            return self._reader, self._writer
        reader, writer = await asyncio.open_unix_connection(str(self.path), limit=MAX_LINE)
        self._reader, self._writer = reader, writer
        sync_id = next(_ids)
        writer.write(SENTINEL + _line("guest-sync-delimited", {"id": sync_id}))
        await writer.drain()
        while True:  # stale bytes, then the sentinel, then (maybe stale answers and) our id
            await reader.readuntil(SENTINEL)
            try:
                answer = json.loads(await reader.readline())
            except ValueError:
                continue
            if isinstance(answer, dict) and answer.get("return") == sync_id:
                return reader, writer

    async def _call(self, command: str, arguments: dict[str, Any] | None, timeout_s: float) -> Any:
        try:
            async with asyncio.timeout(timeout_s):
                reader, writer = await self._open()
                writer.write(_line(command, arguments))
                await writer.drain()
                raw = await reader.readline()
        except (TimeoutError, OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError) as e:
            await self.close()  # the next call starts on a clean, resynchronised connection
            why = f"no answer within {timeout_s:g} s" if isinstance(e, TimeoutError) else str(e) or type(e).__name__
            raise GuestAgentError(f"guest agent: {command}: {why}") from None
        if not raw:
            await self.close()
            raise GuestAgentError(f"guest agent: {command}: the channel closed")
        try:
            answer = json.loads(raw.lstrip(SENTINEL))
        except ValueError:
            await self.close()
            raise GuestAgentError(f"guest agent: {command}: an answer that is not JSON") from None
        if isinstance(answer, dict) and "error" in answer:
            err = answer["error"] if isinstance(answer["error"], dict) else {}
            raise GuestAgentError(f"guest agent: {command}: {err.get('desc') or err.get('class') or 'error'}")
        if not isinstance(answer, dict) or "return" not in answer:
            await self.close()
            raise GuestAgentError(f"guest agent: {command}: unexpected answer {str(answer)[:80]}")
        return answer["return"]

    async def execute(
        self, command: str, arguments: dict[str, Any] | None = None, timeout_s: float | None = None
    ) -> Any:
        """Run one guest agent command and return its ``return`` value (GuestAgentError otherwise)."""
        async with self.lock:
            return await self._call(command, arguments, self.timeout_s if timeout_s is None else timeout_s)

    # -- the commands kasou uses -------------------------------------------------------------

    async def ping(self) -> None:
        await self.execute("guest-ping")

    async def run(self, argv: list[str], timeout_s: float, every_s: float = 0.5) -> tuple[int, bytes, bytes]:
        """Run a program in the guest (``guest-exec``) and wait for it, at most ``timeout_s``: exit code and output.
        A program still running then is left to the guest (its agent cannot kill it); the call says so."""
        started = await self.execute("guest-exec", {"path": argv[0], "arg": argv[1:], "capture-output": True})
        pid = int(started["pid"]) if isinstance(started, dict) and "pid" in started else None
        if pid is None:
            raise GuestAgentError(f"guest agent: guest-exec: unexpected answer {str(started)[:80]}")
        deadline = time.monotonic() + timeout_s
        while True:
            st = await self.execute("guest-exec-status", {"pid": pid})
            if isinstance(st, dict) and st.get("exited"):
                code = int(st["exitcode"]) if "exitcode" in st else -1
                return code, _b64(st.get("out-data")), _b64(st.get("err-data"))
            if time.monotonic() > deadline:
                raise OperationTimeout(f"{argv[0]} did not end in the guest within {timeout_s:g} s")
            await asyncio.sleep(every_s)

    async def os_name(self) -> str | None:
        info = await self.execute("guest-get-osinfo")
        if not isinstance(info, dict):
            return None
        return info.get("pretty-name") or info.get("name") or info.get("id")

    async def hostname(self) -> str | None:
        info = await self.execute("guest-get-host-name")
        return info.get("host-name") if isinstance(info, dict) else None

    async def addresses(self) -> list[str]:
        """The guest's IP addresses, loopback and link-local ones left out."""
        return ips_of(await self.execute("guest-network-get-interfaces"))

    async def shutdown(self, mode: str = "powerdown") -> None:
        """Ask the guest to shut down. Success has no answer: an error within a second is raised."""
        async with self.lock:
            try:
                await self._call("guest-shutdown", {"mode": mode}, SHUTDOWN_ERROR_WAIT_S)
            except GuestAgentError as e:
                if "no answer within" not in e.message:
                    raise
            finally:
                await self.close()  # the agent goes down with the guest

    async def freeze_status(self) -> str:
        return str(await self.execute("guest-fsfreeze-status"))

    async def freeze(self) -> int:
        """Freeze the guest's file systems (``guest-fsfreeze-freeze``); how many it froze."""
        count = await self.execute("guest-fsfreeze-freeze", timeout_s=FREEZE_TIMEOUT_S)
        return int(count) if isinstance(count, int) else 0

    async def thaw(self) -> None:
        """Thaw the guest's file systems, tried again (each bounded); raised only if it may still be frozen."""
        last: GuestAgentError | None = None
        for _ in range(THAW_TRIES):
            try:
                await self.execute("guest-fsfreeze-thaw", timeout_s=THAW_TIMEOUT_S)
                return
            except GuestAgentError as e:
                last = e
        assert last is not None
        raise GuestAgentError(f"the guest's file systems may still be frozen: {last.message}")


def _b64(data: Any) -> bytes:
    return base64.b64decode(data) if isinstance(data, str) else b""


def _line(command: str, arguments: dict[str, Any] | None) -> bytes:
    msg: dict[str, Any] = {"execute": command}
    if arguments:
        msg["arguments"] = arguments
    return json.dumps(msg).encode() + b"\n"


def ips_of(interfaces: Any) -> list[str]:
    """Addresses from ``guest-network-get-interfaces``: not loopback, not link-local, in the agent's order."""
    out: list[str] = []
    for iface in interfaces if isinstance(interfaces, list) else []:
        for a in iface.get("ip-addresses") or [] if isinstance(iface, dict) else []:
            try:
                ip = ipaddress.ip_address(str(a.get("ip-address")))
            except ValueError:
                continue
            if not (ip.is_loopback or ip.is_link_local) and str(ip) not in out:
                out.append(str(ip))
    return out


# -- what the driver keeps of a VM's agent, and the poller that fills it ---------------------------

POLL_S = 3.0  # how often a running guest's agent is pinged
DETAILS_EVERY_S = 30.0  # OS, host name and addresses are read again this often (and on the first answer)


@dataclass
class AgentState:
    """What the host knows of one VM's guest agent."""

    answering: bool = False
    last_answer: float | None = None  # monotonic; None: never answered (since the last reset)
    os: str | None = None
    hostname: str | None = None
    ips: list[str] = field(default_factory=list)
    details_at: float | None = None  # monotonic, when os/hostname/ips were read

    def forget(self) -> None:
        """The guest was reset: nothing it said still holds, and it must answer again to count."""
        self.answering = False
        self.last_answer = None
        self.details_at = None
        self.os, self.hostname, self.ips = None, None, []


async def poll_once(agent: GuestAgent, state: AgentState) -> None:
    """Ping the agent; on an answer, read its details when they are due. Never raises GuestAgentError."""
    try:
        await agent.ping()
    except GuestAgentError:
        state.answering = False
        return
    now = time.monotonic()
    state.answering, state.last_answer = True, now
    # read again when due, and on every round while the guest has no address yet (DHCP comes after the agent)
    if state.details_at is not None and now - state.details_at < DETAILS_EVERY_S and state.ips:
        return
    state.details_at = now
    with contextlib.suppress(GuestAgentError):  # an old agent may lack a command: the rest still counts
        state.os = await agent.os_name()
    with contextlib.suppress(GuestAgentError):
        state.hostname = await agent.hostname()
    with contextlib.suppress(GuestAgentError):
        state.ips = await agent.addresses()


async def poll(agent: GuestAgent, state: AgentState, alive: Any, running: Any, every_s: float = POLL_S) -> None:
    """Ping the agent every ``every_s`` while ``alive()``, when ``running()`` (a paused guest cannot answer)."""
    try:
        while alive():
            if running():
                await poll_once(agent, state)
            elif state.last_answer is not None:
                state.last_answer = time.monotonic()  # a paused guest cannot answer: its silence does not count
            await asyncio.sleep(every_s)
    finally:
        await agent.close()


@contextlib.asynccontextmanager
async def quiesced(agent: GuestAgent | None, state: AgentState | None) -> AsyncIterator[list[Consistency]]:
    """Around a point in time (a snapshot's or a backup's): freeze the guest's file systems if its agent
    answers. Yields a one-element list the body may read: ``application`` (frozen) or ``crash`` (no agent
    answered, or the freeze failed: the guest runs on unfrozen, as after a power cut). Thawed in any case.

    A guest whose agent was not answering is not asked at all: a guest without an agent costs nothing.
    """
    result: list[Consistency] = ["crash"]
    if agent is None or state is None or not state.answering:
        yield result
        return
    try:
        try:
            await agent.freeze()
            result[0] = "application"
        except GuestAgentError as e:  # the point in time is crash-consistent; the guest runs on
            log.warning("the guest's file systems could not be frozen (%s): the point in time is crash-consistent", e)
        yield result
    finally:
        # Also after a freeze that failed or timed out: the guest may have frozen after kasou stopped waiting.
        # A thaw that fails every try is raised: the operation fails and says the guest may still be frozen.
        await agent.thaw()
