"""Console recordings in the API: which consoles are recorded, and ``/v1/recordings`` (permission ``audit``).

Policy (:func:`must_record`): every console of an administrator, operator or vendor (and of the API token)
is recorded; a vendor's always, whatever any setting says. A clinician's desktop is recorded when its
desktop pool says ``record`` (:class:`kasou.model.desktops.ConsolePolicy`). Serial consoles too, the same way.

A recording that cannot be written (the disk full, the directory not writable) never drops silently: a
vendor's console is refused, or closed, saying that its recording failed; any other console goes on
unrecorded from there and an error event (``console_recording_failed``) is raised for the operators. The
``console_recording`` record in the audit chain says ``state: incomplete`` with the error.

Routes: ``GET /v1/recordings`` (filters ``vm``, ``user``, ``window``), ``GET /v1/recordings/{id}``,
``GET /v1/recordings/{id}/stream`` (the checked, decrypted event stream the replay page plays; audited as
``console_recording_replay``), ``GET /v1/recordings/{id}/export`` (a self-describing file for an
investigation, :data:`EXPORT_MAGIC`; audited as ``console_recording_export``), ``POST
/v1/recordings/{id}/hold`` (kept past retention while an investigation is open). A recording is read on
the API server that holds its file.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import TYPE_CHECKING, Any, Protocol

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from kasou.api.auth import Principal
from kasou.control import audit
from kasou.control.recording_store import RecordingMeta, Recordings, for_store, new_id, summary
from kasou.control.recordings import EVENT, FROM_CLIENT, RecordingWriter, check, encode_event
from kasou.model.names import validate_name

if TYPE_CHECKING:
    from kasou.api.deps import Services


class LiveConsole(Protocol):
    """What a recording needs of an open console (:class:`kasou.api.console.LiveConsole`)."""

    ticket: Any  # kasou.api.console.Ticket: user, role, via, vm, kind, window, policy
    source: str
    id: str


EXPORT_MAGIC = b"KASOU-RECORDING-EXPORT 1\n"
EVENT_FORMAT = ("events, big-endian: u8 direction (0 server to client: the screen, or a serial console's output; "
                "1 client to server: RFB messages (keys, pointer) or typed bytes) | u64 microseconds since the "
                "console opened | u32 length | that many bytes")  # fmt: skip
BATCH = 256 * 1024


def must_record(role: str, via: str, pool_says: bool) -> bool:
    """Whether a console is recorded: always for staff and vendors (and tokens), a clinician's by their pool."""
    return role != "clinician" or via == "token" or pool_says


async def start(svc: Services, live: LiveConsole) -> RecordingWriter | None:
    """The recording of a console that opens, if the policy asks for one (OSError if it cannot be made)."""
    t = live.ticket
    if not must_record(t.role, t.via, t.policy.record):
        return None
    meta = RecordingMeta(id=new_id(), vm=t.vm, user=t.user, role=t.role or "?", via=t.via, source=live.source,
                         kind=t.kind, window=t.window, console=live.id, host="", started=time.time())  # fmt: skip
    recs = for_store(svc.store)
    return await recs.begin(meta.model_copy(update={"host": recs.host}))


async def finish(svc: Services, live: LiveConsole, w: RecordingWriter) -> None:
    """Close the recording; its ``console_recording`` record in the audit chain (never raises)."""
    with contextlib.suppress(Exception):
        meta = await for_store(svc.store).finish(w)
        t = live.ticket
        actor = {"name": t.user, "role": t.role or "?", "via": t.via}
        await audit.record(svc.store, "console_recording", actor=actor, source=live.source, target=f"vms/{t.vm}",
                           ok=meta.state == "complete", message=meta.error or "", details=summary(meta))  # fmt: skip
        await for_store(svc.store).sweep()


_closing: set[asyncio.Task[None]] = set()


async def finish_shielded(svc: Services, live: LiveConsole, w: RecordingWriter) -> None:
    """:func:`finish` in a task of its own: a console's handler cancelled as it ends (a server shutting
    down) still closes the recording with its final frame and writes its audit record."""
    task = asyncio.create_task(finish(svc, live, w), name=f"recording-close-{w.id}")
    _closing.add(task)
    task.add_done_callback(_closing.discard)
    await asyncio.shield(task)


async def failed(svc: Services, live: LiveConsole, why: str) -> None:
    """An error event: a console whose recording could not be made or written."""
    t = live.ticket
    with contextlib.suppress(Exception):
        await svc.vms.events.emit("console_recording_failed", f"vm/{t.vm}",
                                  f"the console of {t.vm} opened by {t.user} is not recorded from here: {why}",
                                  "error")  # fmt: skip


def typed(evs: Iterator[tuple[int, int, bytes]], kind: str) -> str:
    """What the client typed, as text: key presses (printable keysyms, Return, Tab, BackSpace) of an RFB
    console, the bytes of a serial one."""
    out = []
    names = {0xFF0D: "\n", 0xFF09: "\t", 0xFF08: "<BS>", 0xFF1B: "<Esc>", 0xFFFF: "<Del>"}
    for direction, _, data in evs:
        if direction != FROM_CLIENT:
            continue
        if kind == "serial":
            out.append(data.decode("utf-8", "replace"))
            continue
        pos = 0
        while pos + 8 <= len(data) and data[pos] == 4:  # KeyEvent: type, down, pad, u32 keysym
            down, sym = data[pos + 1], int.from_bytes(data[pos + 4 : pos + 8])
            if down:
                out.append(chr(sym) if 0x20 <= sym < 0x7F else names.get(sym, ""))
            pos += 8
    return "".join(out)[-100_000:]


def recording_routes(svc: Callable[[], Services], principal: Callable[[Request], Awaitable[Principal]]) -> APIRouter:
    r = APIRouter(prefix="/v1/recordings")

    def recs() -> Recordings:
        return for_store(svc().store)

    async def audited(request: Request, action: str, meta: RecordingMeta, details: dict[str, Any]) -> None:
        p = await principal(request)
        await audit.record(svc().store, action, actor=p, source=request.client.host if request.client else "",
                           target=f"vms/{meta.vm}", details={"recording": meta.id, **details})  # fmt: skip

    async def checked(meta: RecordingMeta) -> dict[str, Any]:
        recs().local(meta)
        return await asyncio.to_thread(check, recs().path(meta.id), recs().key(), meta.id)

    @r.get("")
    async def list_recordings(vm: str | None = None, user: str | None = None, window: str | None = None
                              ) -> list[RecordingMeta]:  # fmt: skip
        """Console recordings (every host's), oldest first; filtered by VM, user, maintenance window."""
        if vm is not None:
            validate_name(vm)
        await recs().sweep()
        return list(await recs().find(vm, user, window))

    @r.get("/{rec_id}")
    async def get_recording(rec_id: str) -> RecordingMeta:
        return await recs().get(rec_id)

    @r.post("/{rec_id}/hold")
    async def hold_recording(rec_id: str, on: bool = True) -> RecordingMeta:
        """Keep a recording past retention while an investigation is open (``on=false``: release it)."""
        return await recs().set_hold(rec_id, on)

    @r.get("/{rec_id}/stream")
    async def stream_recording(request: Request, rec_id: str) -> StreamingResponse:
        """The recording's events, checked and decrypted (see ``EVENT_FORMAT``), for the replay page."""
        meta = await recs().get(rec_id)
        result = await checked(meta)
        await audited(request, "console_recording_replay", meta, {"digest_ok": result["digest_ok"]})
        return StreamingResponse(batches(meta), media_type="application/octet-stream",
                                 headers={"x-kasou-duration-us": str(duration_us(meta))})  # fmt: skip

    def batches(meta: RecordingMeta) -> Iterator[bytes]:
        buf = bytearray()
        for d, us, data in recs().events(meta):
            buf += encode_event(d, us, data)
            if len(buf) >= BATCH:
                yield bytes(buf)
                buf.clear()
        if buf:
            yield bytes(buf)

    def duration_us(meta: RecordingMeta) -> int:
        return int(((meta.ended or meta.started) - meta.started) * 1e6)

    @r.get("/{rec_id}/export")
    async def export_recording(request: Request, rec_id: str) -> StreamingResponse:
        """A decrypted, self-describing file for an investigation: ``KASOU-RECORDING-EXPORT 1``, one line of
        JSON (the metadata, the digest check, what was typed, the event format), then the events."""
        meta = await recs().get(rec_id)
        result = await checked(meta)
        p = await principal(request)
        text = await asyncio.to_thread(lambda: typed(recs().events(meta), meta.kind))
        head = {"recording": meta.model_dump(mode="json"), "trailer": result["trailer"],
                "sha256": result["sha256"], "digest_ok": result["digest_ok"] and result["sha256"] == meta.sha256,
                "event_header": EVENT.format, "event_format": EVENT_FORMAT, "typed": text,
                "exported_by": p.name, "exported_at": time.time()}  # fmt: skip
        await audited(request, "console_recording_export", meta, {"digest_ok": head["digest_ok"],
                                                                 "sha256": result["sha256"]})  # fmt: skip

        def body() -> Iterator[bytes]:
            yield EXPORT_MAGIC + json.dumps(head, ensure_ascii=False, sort_keys=True).encode() + b"\n"
            yield from batches(meta)

        name = f"recording-{meta.id}.kasou-export"
        return StreamingResponse(body(), media_type="application/octet-stream",
                                 headers={"content-disposition": f'attachment; filename="{name}"'})  # fmt: skip

    return r
