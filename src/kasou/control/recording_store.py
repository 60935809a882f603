"""Console recordings kept by the API servers: where their files are, their records in the store, retention.

Each API server writes the recordings of the consoles it proxies into its own ``recordings_dir()``
(``KASOU_HOME/recordings``, mode 0700; files ``<id>.kasourec``, mode 0600, in the format of
:mod:`kasou.control.recordings`). What every host can list is a record under ``recordings/<id>`` in the
store (:class:`RecordingMeta`: who, which VM, the vendor's window, start, end, sizes, digest, the host that
holds the file); the audit chain gets a ``console_recording`` record when a recording ends. A recording is
read (replayed, exported) on the host that holds it.

Retention (``KASOU_RECORDING_DAYS``, :func:`kasou.config.recording_days`): recordings that ended longer ago
are deleted from this host (file and record) by :meth:`Recordings.sweep`, at most once an hour as
recordings end or are listed; every deletion is a ``console_recording_deleted`` record in the audit chain.
A recording marked ``hold`` (an investigation is open) is kept whatever its age.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel

from kasou.config import host_name, recording_days, recordings_dir
from kasou.control import audit
from kasou.control.recordings import SUFFIX, RecordingWriter, events, read_frames
from kasou.control.sealed import default_key_path, load_or_create
from kasou.errors import Conflict, NotFound
from kasou.store.base import Store

PREFIX = "recordings/"
SWEEP_EVERY_S = 3600.0
SYSTEM = {"name": "kasou", "role": "system", "via": "retention"}


class RecordingMeta(BaseModel):
    id: str
    vm: str
    user: str
    role: str
    via: str
    source: str
    kind: str  # vnc or serial
    window: str | None = None  # the vendor's maintenance window
    console: str = ""  # the console's id (in its console_open and console_close records)
    host: str  # the API server that holds the file
    started: float
    ended: float | None = None
    state: Literal["recording", "complete", "incomplete"] = "recording"
    size: int = 0  # bytes of the sealed file
    plain_bytes: int = 0  # bytes of the event stream
    events: int = 0
    sha256: str | None = None  # of the event stream
    error: str | None = None
    hold: bool = False  # kept past retention (an investigation)


def new_id() -> str:
    return secrets.token_hex(16)


class Recordings:
    """This API server's recordings and the records of every host's."""

    def __init__(self, store: Store, directory: Path | None = None, host: str | None = None) -> None:
        self.store = store
        self.directory = directory or recordings_dir()
        self.host = host or host_name()
        self._key: bytes | None = None
        self._swept = -SWEEP_EVERY_S

    def key(self) -> bytes:
        if self._key is None:
            self._key = load_or_create(default_key_path(self.store))
        return self._key

    def path(self, rec_id: str) -> Path:
        if len(rec_id) != 32 or any(c not in "0123456789abcdef" for c in rec_id):
            raise NotFound(f"no recording {rec_id!r}")
        return self.directory / (rec_id + SUFFIX)

    async def begin(self, meta: RecordingMeta) -> RecordingWriter:
        """Make the file and the record; OSError (nothing left behind) if the file cannot be made."""
        key = await asyncio.to_thread(self.key)
        w = RecordingWriter(self.path(meta.id), key, meta.id, meta.model_dump(mode="json"))
        await w.start()
        try:
            await self.store.put(PREFIX + meta.id, meta.model_dump(mode="json"))
        except BaseException:
            await w.close()
            self.path(meta.id).unlink(missing_ok=True)
            raise
        return w

    async def finish(self, w: RecordingWriter) -> RecordingMeta:
        """Close the file; the record says how it ended."""
        end = await w.close()
        meta = RecordingMeta.model_validate(w.meta)
        meta = meta.model_copy(update={
            "ended": end["ended"], "size": end["size"], "plain_bytes": end["plain_bytes"], "events": end["events"],
            "sha256": end["sha256"], "error": end["error"], "state": "complete" if end["complete"] else "incomplete",
        })  # fmt: skip
        with contextlib.suppress(Exception):
            await self.store.put(PREFIX + meta.id, meta.model_dump(mode="json"))
        return meta

    async def get(self, rec_id: str) -> RecordingMeta:
        self.path(rec_id)
        e = await self.store.get(PREFIX + rec_id)
        if e is None:
            raise NotFound(f"no recording {rec_id!r}")
        return RecordingMeta.model_validate(e.value)

    async def find(
        self, vm: str | None = None, user: str | None = None, window: str | None = None
    ) -> list[RecordingMeta]:
        out = [RecordingMeta.model_validate(e.value) for e in await self.store.range(PREFIX)]
        out = [m for m in out if (vm is None or m.vm == vm) and (user is None or m.user == user)
               and (window is None or m.window == window)]  # fmt: skip
        return sorted(out, key=lambda m: m.started)

    async def set_hold(self, rec_id: str, hold: bool) -> RecordingMeta:
        meta = (await self.get(rec_id)).model_copy(update={"hold": hold})
        await self.store.put(PREFIX + rec_id, meta.model_dump(mode="json"))
        return meta

    def local(self, meta: RecordingMeta) -> Path:
        """The file of a recording this host holds; Conflict if another host holds it, or it is gone."""
        if meta.host != self.host:
            raise Conflict(f"recording {meta.id} is held by host {meta.host}: read it through that host's API")
        p = self.path(meta.id)
        if not p.exists():
            raise Conflict(f"the file of recording {meta.id} is missing on {self.host}")
        return p

    def frames(self, meta: RecordingMeta) -> Iterator[tuple[int, bytes, bool]]:
        """The checked frames of a local recording (a blocking iterator: run it in a thread)."""
        path, key = self.local(meta), self.key()
        with open(path, "rb") as f:
            yield from read_frames(f, key, meta.id)

    def events(self, meta: RecordingMeta) -> Iterator[tuple[int, int, bytes]]:
        return events(self.frames(meta))

    async def sweep(self, now: float | None = None, force: bool = False) -> list[str]:
        """Delete this host's recordings older than the retention (at most once an hour unless ``force``)."""
        mono = time.monotonic()
        if not force and mono - self._swept < SWEEP_EVERY_S:
            return []
        self._swept = mono
        cutoff = (time.time() if now is None else now) - recording_days() * 86400.0
        gone = []
        for m in await self.find():
            if m.host != self.host or m.hold or m.ended is None or m.ended >= cutoff:
                continue
            with contextlib.suppress(NotFound):
                await asyncio.to_thread(self.path(m.id).unlink, True)
            await self.store.delete(PREFIX + m.id)
            details = {"recording": m.id, "user": m.user, "started": m.started, "ended": m.ended,
                       "sha256": m.sha256, "retention_days": recording_days(), "host": m.host}  # fmt: skip
            await audit.record(self.store, "console_recording_deleted", actor=SYSTEM, target=f"vms/{m.vm}",
                               details=details)  # fmt: skip
            gone.append(m.id)
        return gone


_services: weakref.WeakKeyDictionary[Store, Recordings] = weakref.WeakKeyDictionary()


def for_store(store: Store) -> Recordings:
    """The one :class:`Recordings` of ``store`` in this process (the directory and host from the environment)."""
    r = _services.get(store)
    if r is None:
        r = _services[store] = Recordings(store)
    return r


def summary(meta: RecordingMeta) -> dict[str, Any]:
    """The ``console_recording`` audit record's details."""
    return {"recording": meta.id, "console": meta.console, "kind": meta.kind, "window": meta.window,
            "started": meta.started, "ended": meta.ended, "size": meta.size, "plain_bytes": meta.plain_bytes,
            "sha256": meta.sha256, "host": meta.host, "state": meta.state, "error": meta.error}  # fmt: skip
