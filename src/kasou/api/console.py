"""The consoles: one-time tickets and the websocket proxy from the browser to a VM's VNC display, and from
``kasou vm console`` to its serial console (a ticket of kind ``serial``: plain bytes, no RFB filter).

::

    browser (noVNC) ──ws /v1/console/ws?ticket=…──► API server ──ws /agent/v1/vms/{vm}/vnc──► agent ──► vnc.sock (QEMU)
                         session cookie checked       RFB client messages framed,      unix socket or TCP
                                                      ClientCutText dropped by policy

1. ``POST /v1/vms/{name}/console-ticket`` checks the right: ``console`` (administrators, operators)
   for any VM; a clinician only for the desktop assigned to them now (``Desktops.user_may_open``).
   The answer is a random ticket (256 bits) that this API server keeps only as a SHA-256, bound
   to the user, the session that asked and the VM, valid once and for ``TICKET_TTL_S`` seconds.
2. ``/v1/console/ws?ticket=…`` takes the ticket (a second use, an expired or unknown ticket is
   closed with 1008, policy violation, and nothing is connected), checks that the request still
   carries the session the ticket was issued to (or the API token), and connects to the agent of
   the VM's host. Bytes then flow both ways; the client's are framed as RFB messages
   (:mod:`kasou.api.rfb`) so the console's policy can drop clipboard data.
3. The console ends when either side closes, on sign-out of its session, when its session ends,
   when its API token is revoked or its user deleted or no longer allowed to open it (checked every
   ``SESSION_CHECK_EVERY_S``), or after ``KASOU_CONSOLE_IDLE`` seconds without input. A vendor's console,
   opened inside a maintenance window (:mod:`kasou.api.windows`), closes within a second of the window's end
   and at the next check after the window is revoked. Its start and end
   are records in the audit chain (``console_open``, ``console_close``: who, which VM, from where, how
   long, how many bytes each way; a ticket refused at the websocket is a ``console_open`` that failed)
   and operator events (``console_opened``, ``console_closed``).
4. What passes is recorded (:mod:`kasou.api.recordings`: every console of staff and vendors, a clinician's
   desktop when its pool says so), sealed with the site's secrets key, with a ``console_recording``
   record in the audit chain; a vendor's console whose recording cannot be written is closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import urlsplit

from fastapi import APIRouter, Request, WebSocket, WebSocketDisconnect
from httpx_ws import WebSocketDisconnect as AgentDisconnect
from httpx_ws import WebSocketNetworkError
from pydantic import BaseModel

from kasou.api import recordings
from kasou.api.auth import SESSION_COOKIE, Principal, bearer_principal
from kasou.api.rfb import ClientFilter, RfbProtocolError
from kasou.config import console_idle_s
from kasou.control import audit
from kasou.control.recordings import FROM_CLIENT, FROM_SERVER, RecordingWriter
from kasou.errors import Conflict, Forbidden, KasouError
from kasou.model.desktops import ConsolePolicy
from kasou.model.names import validate_name
from kasou.model.users import PERMISSIONS

if TYPE_CHECKING:
    from kasou.api.deps import Services

log = logging.getLogger(__name__)

TICKET_TTL_S = 10.0
MAX_TICKETS = 10_000  # outstanding at once on one API server (expired ones are dropped first)
AGENT_CONNECT_TIMEOUT_S = 10.0
SESSION_CHECK_EVERY_S = 30.0  # while a console is in use, its session is checked (and kept alive) this often
#: Close codes: 1008 policy violation (ticket, session, right), 4409 the VM does not run,
#: 4503 its display is unreachable.
POLICY_VIOLATION = 1008
NOT_RUNNING = 4409
UNREACHABLE = 4503
NOT_RECORDED = 4507  # a vendor's console whose recording cannot be written
SHOWN_STATES = ("running", "paused", "migrating", "shutting_down")


def _hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


@dataclass(frozen=True)
class Ticket:
    user: str
    via: str  # "session" or "token"
    session: str | None  # the SHA-256 of the session that asked
    vm: str
    expires: float  # time.monotonic()
    policy: ConsolePolicy
    role: str = ""
    kind: str = "vnc"  # vnc (the display) or serial (the first serial port, kasou vm console)
    window: str | None = None  # a vendor's maintenance window it was opened under
    window_ends: float | None = None  # ... and when that window ends (UNIX time, on the windows' clock)


class ConsoleTicket(BaseModel):
    ticket: str
    url: str  # the websocket's path, ticket included
    vm: str
    expires_in_s: float
    policy: ConsolePolicy  # what the console carries besides screen, keyboard and mouse


class ConsoleTickets:
    """Tickets issued by this API server, by their SHA-256 only; each can be taken once."""

    def __init__(self, ttl_s: float | None = None) -> None:
        self._ttl_s = ttl_s
        self._by_hash: dict[str, Ticket] = {}

    @property
    def ttl_s(self) -> float:
        return self._ttl_s if self._ttl_s is not None else TICKET_TTL_S

    def issue(
        self,
        p: Principal,
        vm: str,
        policy: ConsolePolicy,
        kind: str = "vnc",
        window: str | None = None,
        window_ends: float | None = None,
    ) -> str:
        now = time.monotonic()
        for h in [h for h, t in self._by_hash.items() if t.expires <= now]:
            del self._by_hash[h]
        if len(self._by_hash) >= MAX_TICKETS:
            raise Conflict("too many console tickets are waiting to be used; try again in a few seconds")
        secret = secrets.token_urlsafe(32)  # 256 bits
        session = _hash(p.session) if p.session else None
        self._by_hash[_hash(secret)] = Ticket(
            p.name, p.via, session, vm, now + self.ttl_s, policy, p.role.value, kind, window, window_ends
        )
        return secret

    def take(self, secret: str) -> Ticket | None:
        """The ticket, now used up; None if unknown, used before or expired."""
        t = self._by_hash.pop(_hash(secret), None) if secret else None
        if t is None or t.expires <= time.monotonic():
            return None
        return t

    def __len__(self) -> int:
        return len(self._by_hash)


@dataclass(eq=False)  # one per websocket, kept in a set by identity
class LiveConsole:
    ticket: Ticket
    source: str
    started: float = field(default_factory=time.time)
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    why: str = ""
    ended_by_check: bool | str = False  # its session, token or right ended (True: 1008), "recording" failed (4507)
    id: str = field(default_factory=lambda: secrets.token_hex(8))  # pairs its console_open and console_close
    clock: Callable[[], float] = time.time  # the clock a maintenance window's end is read on


class Consoles:
    """The consoles open through this API server (to end them at sign-out) and their tickets."""

    def __init__(self) -> None:
        self.tickets = ConsoleTickets()
        self.live: set[LiveConsole] = set()

    async def on_logout(self, user: str, session_token: str) -> None:
        sid = _hash(session_token)
        for c in list(self.live):
            if c.ticket.session == sid:
                c.why = "signed out"
                c.stop.set()


def console_routes(
    svc: Callable[[], Services], principal: Callable[[Request], Awaitable[Principal]], token: str
) -> APIRouter:
    r = APIRouter()
    consoles = Consoles()
    hooked: list[Services] = []

    def hook() -> None:
        s = svc()
        if s not in hooked:
            s.logout_hooks.append(consoles.on_logout)
            hooked.append(s)

    async def may_open(user: str, role_can_console: bool, vm: str, kind: str = "vnc") -> bool:
        if role_can_console:
            return True
        if kind != "vnc":
            return False  # a clinician sees their desktop's screen, never a serial console
        desktops = getattr(svc().vms, "desktops", None)
        return desktops is not None and bool(await desktops.user_may_open(user, vm))

    @r.post("/v1/vms/{name}/console-ticket")
    async def console_ticket(name: str, request: Request, kind: Literal["vnc", "serial"] = "vnc") -> ConsoleTicket:
        """A one-time ticket for the websocket of VM ``name``'s console (valid 10 s, for this session only).

        ``kind``: ``vnc``, its display (the web console), or ``serial``, its serial console
        (``kasou vm console``). Administrators and operators may open any VM's console; a clinician only
        their own desktop's display.
        """
        p = await principal(request)
        validate_name(name)
        if not await may_open(p.name, p.can("console"), name, kind):
            raise Forbidden(f"user {p.name!r} may not open the console of VM {name!r}")
        vm = await svc().vms.get(name)
        if vm.state.value not in SHOWN_STATES:
            raise Conflict(f"VM {name} is {vm.state.value}: its console shows only while it runs")
        desktops = getattr(svc().vms, "desktops", None)
        policy = await desktops.console_policy(name) if desktops is not None else ConsolePolicy()
        hook()
        window = getattr(request.state, "window", None)  # a vendor's maintenance window (kasou.api.windows)
        ends = (await svc().windows.record(window)).ends_at if isinstance(window, str) else None
        secret = consoles.tickets.issue(p, name, policy, kind, window if isinstance(window, str) else None, ends)
        return ConsoleTicket(ticket=secret, url=f"/v1/console/ws?ticket={secret}", vm=name,
                             expires_in_s=consoles.tickets.ttl_s, policy=policy)  # fmt: skip

    async def refuse(ws: WebSocket, code: int, reason: str) -> None:
        with contextlib.suppress(RuntimeError, WebSocketDisconnect):
            await ws.close(code, reason[:120])

    @r.websocket("/v1/console/ws")
    async def console_ws(ws: WebSocket, ticket: str = "") -> None:
        """The console's websocket (binary RFB); see the module's doc."""
        await ws.accept()
        origin = ws.headers.get("origin")
        if origin and urlsplit(origin).netloc != ws.headers.get("host"):
            return await refuse(ws, POLICY_VIOLATION, "a console opens only from kasou's own pages")
        t = consoles.tickets.take(ticket)
        if t is None:
            return await refuse(ws, POLICY_VIOLATION, "the console ticket is unknown, used or expired")
        cookie = ws.cookies.get(SESSION_COOKIE)
        authorization = ws.headers.get("authorization") or ""
        source = ws.client.host if ws.client else ""
        live = LiveConsole(t, source, clock=svc().windows.clock)

        async def refused(code: int, reason: str) -> None:
            await _audit(svc, "console_open", live, ok=False, message=reason)
            await refuse(ws, code, reason)

        async def still_allowed(in_use: bool) -> str | None:
            """Why the console must end now (None: it goes on): its session ended or its token was revoked,
            its user was deleted or may no longer open this VM. ``in_use``: a session is kept alive."""
            users = svc().users
            try:
                if t.via in ("session", "break_glass"):
                    assert cookie is not None
                    if in_use:
                        user = await users.session_user(cookie)  # checked, and the session stays alive
                    else:  # checked without keeping it alive: the idle limits decide that
                        sess = await users.session_of(cookie)
                        if sess is None:
                            return "the session ended"
                        if sess.break_glass is not None:
                            return None  # the break-glass account is no user record: its session decides
                        user = await users.get(sess.user)
                    name, can = user.name, "console" in PERMISSIONS[user.role]
                else:
                    bp = await bearer_principal(authorization, token, lambda: users)
                    name, can = bp.name, bp.can("console")
            except KasouError:
                return "the session ended" if t.via != "token" else "the API token was revoked or its user removed"
            if not await may_open(name, can, t.vm, t.kind):
                return f"user {name} may no longer open the console of {t.vm}"
            if t.window is not None:
                w = await svc().windows.record(t.window)
                if not w.is_active(svc().windows.clock()):
                    return f"the maintenance window {t.window} is {w.shown_state(svc().windows.clock()).value}"
            return None

        try:
            if t.via in ("session", "break_glass"):
                if not cookie or _hash(cookie) != t.session:
                    return await refused(POLICY_VIOLATION, "the console ticket belongs to another session")
                user = await svc().users.session_user(cookie)
                can = "console" in PERMISSIONS[user.role]
                if user.name != t.user or not await may_open(user.name, can, t.vm, t.kind):
                    return await refused(POLICY_VIOLATION, f"user {user.name} may not open this console")
            else:  # the root token, or the API token of the user the ticket was issued to
                bp = await bearer_principal(authorization, token, lambda: svc().users)
                if bp.name != t.user:
                    return await refused(POLICY_VIOLATION, "the console ticket belongs to another token")
            vm = await svc().vms.get(t.vm)
            if vm.state.value not in SHOWN_STATES:
                return await refused(NOT_RUNNING, f"VM {t.vm} is {vm.state.value}")
            agent = svc().agents.get(vm.host)
        except KasouError as e:
            code = POLICY_VIOLATION if e.code in ("unauthorized", "forbidden") else UNREACHABLE
            return await refused(code, str(e))
        stats: dict[str, int] = {}
        rec: RecordingWriter | None = None
        try:
            async with contextlib.AsyncExitStack() as stack:
                try:
                    async with asyncio.timeout(AGENT_CONNECT_TIMEOUT_S):
                        display = await stack.enter_async_context(
                            agent.serial(t.vm) if t.kind == "serial" else agent.vnc(t.vm)
                        )
                except Exception as e:
                    log.warning("console of %s: the agent of %s refused or did not answer: %r", t.vm, vm.host, e)
                    return await refused(UNREACHABLE, f"the console of VM {t.vm} is not reachable now")
                try:
                    rec = await recordings.start(svc(), live)
                except (OSError, KasouError) as e:
                    why = f"its recording cannot be written ({getattr(e, 'strerror', None) or e})"
                    if t.role == "vendor":
                        return await refused(NOT_RECORDED, f"a vendor's console opens only recorded: {why}")
                    await recordings.failed(svc(), live, why)
                consoles.live.add(live)
                live.started = time.time()
                await _audit(svc, "console_open", live, ok=True, details={"recording": rec.id if rec else None})
                await _event(svc, "console_opened", t, f"{t.user} opened the console of {t.vm} from {source}")
                stats = await _pipe(ws, display, live, t.policy, still_allowed, rec,
                                    lambda why: recordings.failed(svc(), live, why))  # fmt: skip
                code = NOT_RECORDED if live.ended_by_check == "recording" else 1000
                await refuse(ws, POLICY_VIOLATION if live.ended_by_check is True else code, live.why or "closed")
        except* (AgentDisconnect, WebSocketNetworkError, ConnectionError):
            pass  # the display went away as the console closed
        finally:
            if live in consoles.live:
                consoles.live.discard(live)
                took = time.time() - live.started
                msg = f"{t.user} closed the console of {t.vm} after {took:.0f} s ({live.why or 'closed'})"
                if stats.get("dropped_cut_text"):
                    msg += f"; {stats['dropped_cut_text']} clipboard message(s) kept from the VM by policy"
                await _audit(svc, "console_close", live, ok=True, details={
                    "duration_s": round(took, 1), "bytes_from_client": stats.get("up", 0),
                    "bytes_to_client": stats.get("down", 0), "reason": live.why or "closed",
                    "clipboard_dropped": stats.get("dropped_cut_text", 0),
                })  # fmt: skip
                await _event(svc, "console_closed", t, msg)
            if rec is not None:
                await recordings.finish_shielded(svc(), live, rec)
        return None

    return r


async def _audit(
    svc: Callable[[], Services],
    action: str,
    live: LiveConsole,
    ok: bool,
    message: str = "",
    details: dict[str, Any] | None = None,
) -> None:
    """A console_open / console_close record in the audit chain (never raises: kasou.control.audit.record)."""
    t = live.ticket
    actor = {"name": t.user, "role": t.role or "?", "via": t.via}
    if t.window:
        details = {"window": t.window, **(details or {})}  # the vendor's maintenance window
    with contextlib.suppress(Exception):
        await audit.record(
            svc().store, action, actor=actor, source=live.source, target=f"vms/{t.vm}", ok=ok,
            status=None if ok else POLICY_VIOLATION, message=message,
            details={"console": live.id, "kind": t.kind, "clipboard": t.policy.clipboard, **(details or {})},
        )  # fmt: skip


async def _event(svc: Callable[[], Services], kind: str, t: Ticket, message: str) -> None:
    with contextlib.suppress(Exception):  # an event that cannot be written never breaks a console
        await svc().vms.events.emit(kind, f"vm/{t.vm}", message, "info")


async def _pipe(
    ws: WebSocket,
    display: Any,
    live: LiveConsole,
    policy: ConsolePolicy,
    still_allowed: Callable[[bool], Awaitable[str | None]],
    rec: RecordingWriter | None = None,
    rec_failed: Callable[[str], Awaitable[None]] | None = None,
) -> dict[str, int]:
    """Browser <-> agent until one ends, the console is stopped, it idles too long, or its session or token
    ends (``still_allowed``, every ``SESSION_CHECK_EVERY_S``: with True when there was input since the
    last check, so that a session in use stays alive)."""
    filt = ClientFilter(clipboard=policy.clipboard) if live.ticket.kind == "vnc" else None  # serial: plain bytes
    last_input = time.monotonic()
    idle = console_idle_s()
    stats = {"up": 0, "down": 0, "dropped_cut_text": 0}

    async def up() -> None:
        nonlocal last_input
        while True:
            msg = await ws.receive()
            if msg["type"] == "websocket.disconnect":
                live.why = live.why or "closed by the browser"
                return
            data = msg.get("bytes") or (msg.get("text") or "").encode()
            try:
                out = filt.feed(data) if filt is not None else data
            except RfbProtocolError as e:
                live.why = f"refused: {e}"
                return
            stats["dropped_cut_text"] = filt.dropped_cut_text if filt is not None else 0
            if out:
                last_input = time.monotonic()
                stats["up"] += len(out)
                await display.send_bytes(out)
                if rec is not None:
                    await rec.add(FROM_CLIENT, out)

    async def down() -> None:
        try:
            while True:
                data = await display.receive_bytes()
                stats["down"] += len(data)
                await ws.send_bytes(data)
                if rec is not None:
                    await rec.add(FROM_SERVER, data)
        except AgentDisconnect as e:
            live.why = live.why or f"the display closed ({e.reason or e.code})"

    async def watch() -> None:
        checked = time.monotonic()
        every = SESSION_CHECK_EVERY_S
        while not live.stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(live.stop.wait(), min(1.0, every))
            now = time.monotonic()
            if now - last_input > idle:
                live.why = f"no input for {idle:.0f} s"
                return
            ends = live.ticket.window_ends
            if ends is not None and live.clock() >= ends:
                live.why, live.ended_by_check = f"the maintenance window {live.ticket.window} ended", True
                return
            if now - checked > every:
                in_use = last_input >= checked
                checked = now
                why = await still_allowed(in_use)
                if why is not None:
                    live.why, live.ended_by_check = why, True
                    return

    async def recording() -> None:
        """A recording that fails: a vendor's console ends; any other goes on and an error event is raised."""
        assert rec is not None
        await rec.failed.wait()
        why = rec.error or "the recording failed"
        if live.ticket.role == "vendor":
            live.why, live.ended_by_check = f"a vendor's console is always recorded: {why}", "recording"
            return
        if rec_failed is not None:
            await rec_failed(why)
        await asyncio.Event().wait()  # the console goes on, unrecorded

    tasks = [asyncio.create_task(c) for c in (up(), down(), watch())]
    if rec is not None:
        tasks.append(asyncio.create_task(recording()))
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, WebSocketDisconnect, RuntimeError, Exception):
                await task
    return stats
