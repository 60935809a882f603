"""Watches on the cluster store: etcd v3's watch API through its JSON gateway, with httpx streaming.

``POST /v3/watch`` with a ``create_request`` (the prefix's ``key`` and ``range_end``, and the
``start_revision`` to resume from) answers with a stream of JSON lines, each ``{"result": ...}``: first
``created``, then one line per batch of ``events`` (a put's ``type`` is left out, as every zero value of
the 3.4 gateway is; a delete's is ``DELETE`` and carries no value). A watch whose ``start_revision`` was
compacted away is answered ``created``, then ``canceled`` with ``compact_revision``: the history from
there is all etcd still has.

Each watch has a connection of its own (never one of the store's pool, which a hundred open streams would
exhaust), to one member at a time. What can go wrong, and what the watch does:

* the stream ends or breaks (the member stopped, a proxy cut it): it opens the watch again from the
  revision after the last event it delivered, on that member or the next;
* the stream is silent for ``idle_s`` seconds: the 3.4 gateway cannot ask for a progress notification
  on a running stream, so the watch asks the member for the prefix's revision (a linearizable read,
  bounded by the store's ``timeout``); a member that cannot answer (dead, cut off from the leader's
  quorum) is left for the next one;
* the revision to resume from was compacted: a ``resync`` event says changes may have been missed,
  and the watch goes on from the compaction's revision.

Each attempt on a member takes at most the store's ``timeout``; when no member can be reached, the
iteration raises StoreError after one round of them (``len(endpoints) * timeout`` at most).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import ssl
from typing import Any, Protocol

import httpx

from kasou.errors import StoreError
from kasou.store.base import Entry, Watch, WatchEvent

IDLE_S = 10.0  # a silent stream is checked this often


def _num(value: Any) -> int:
    return int(value or 0)  # an int64 of the 3.4 gateway: a string, or left out when zero


class EtcdKeys(Protocol):
    """What a watch needs of :class:`~kasou.store.etcd.EtcdStore` (which imports this module)."""

    endpoints: list[str]
    prefix: str
    timeout: float
    tls: ssl.SSLContext | None

    def prefix_range(self, prefix: str) -> dict[str, str]: ...

    def entry(self, kv: dict[str, Any]) -> Entry: ...


class EtcdWatch(Watch):
    """A :class:`~kasou.store.base.Watch` on an :class:`~kasou.store.etcd.EtcdStore` prefix."""

    def __init__(self, store: EtcdKeys, prefix: str, idle_s: float = IDLE_S) -> None:
        self.store = store
        self.prefix = prefix
        self.idle_s = idle_s
        self.next_rev = 0  # the revision the stream (re)starts from; 0 before it started
        self.endpoint: str | None = None  # the member the stream is open on
        self._index = 0
        self._client: httpx.AsyncClient | None = None
        self._response: httpx.Response | None = None
        self._pump: asyncio.Task[None] | None = None
        self._lines: asyncio.Queue[str | Exception] = asyncio.Queue()
        self._pending: list[WatchEvent] = []
        self._closed = False

    # -- Watch -----------------------------------------------------------------------------------------

    async def start(self) -> None:
        if self._client is not None or self._closed:
            return
        tls = self.store.tls
        self._client = httpx.AsyncClient(
            timeout=httpx.Timeout(self.store.timeout, read=None), verify=tls if tls is not None else True
        )
        try:
            await self._connect()
        except BaseException:
            await self.close()
            raise

    async def next(self) -> WatchEvent | None:
        await self.start()
        while not self._pending:
            if self._closed:
                return None
            try:
                item = await asyncio.wait_for(self._lines.get(), self.idle_s)
            except TimeoutError:
                if not await self._member_answers():
                    await self._connect()
                continue
            if isinstance(item, Exception):  # the stream ended or broke: open it again where it stopped
                await self._connect()
                continue
            await self._take(item)
        return self._pending.pop(0)

    async def close(self) -> None:
        self._closed = True
        await self._drop()
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    # -- the stream ------------------------------------------------------------------------------------

    async def _connect(self) -> None:
        """Open the watch from ``next_rev`` on the first member that answers, starting with the current one."""
        await self._drop()
        endpoints = self.store.endpoints
        failures: list[str] = []
        for i in range(len(endpoints)):
            index = (self._index + i) % len(endpoints)
            endpoint = endpoints[index]
            try:
                async with asyncio.timeout(self.store.timeout):
                    if self.next_rev == 0:  # the first start: from now on
                        self.next_rev = await self._revision(endpoint) + 1
                    await self._open(endpoint)
            except (httpx.HTTPError, TimeoutError, ssl.SSLError, StoreError, ValueError) as e:
                failures.append(f"{endpoint}: {str(e) or type(e).__name__}")
                await self._drop()
                continue
            self._index = index
            return
        raise StoreError(f"no etcd endpoint answered a watch on {self.prefix!r} ({'; '.join(failures)})")

    async def _open(self, endpoint: str) -> None:
        assert self._client is not None
        body = {"create_request": {**self.store.prefix_range(self.prefix), "start_revision": str(self.next_rev)}}
        request = self._client.build_request("POST", f"{endpoint}/v3/watch", json=body)
        self._response = await self._client.send(request, stream=True)
        if self._response.status_code != 200:
            raise StoreError(f"HTTP {self._response.status_code}")
        self._lines = asyncio.Queue()
        self._pump = asyncio.create_task(self._read(self._response, self._lines))
        first = await self._lines.get()
        if isinstance(first, Exception):
            raise first
        result = json.loads(first).get("result") or {}
        if not result.get("created"):
            raise StoreError(f"the watch was not created: {first[:200]}")
        self.endpoint = endpoint

    @staticmethod
    async def _read(response: httpx.Response, lines: asyncio.Queue[str | Exception]) -> None:
        try:
            async for line in response.aiter_lines():
                if line.strip():
                    lines.put_nowait(line)
            lines.put_nowait(EOFError("the watch stream ended"))
        except Exception as e:  # httpx's errors, a broken TLS stream: next() opens the watch again
            lines.put_nowait(e)

    async def _drop(self) -> None:
        """Close the stream (if one is open) and end the task reading it."""
        pump, response = self._pump, self._response
        self._pump = self._response = None
        self.endpoint = None
        if pump is not None:
            pump.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await pump
        if response is not None:
            with contextlib.suppress(Exception):
                await response.aclose()

    async def _revision(self, endpoint: str) -> int:
        """The store's revision as ``endpoint`` reports it (a linearizable read of the prefix's count)."""
        assert self._client is not None
        r = await self._client.post(
            f"{endpoint}/v3/kv/range", json={**self.store.prefix_range(self.prefix), "count_only": True}
        )
        data = r.json()
        if r.status_code != 200 or "error" in data:
            raise StoreError(str(data.get("message") or data.get("error") or f"HTTP {r.status_code}"))
        return _num(data.get("header", {}).get("revision"))

    async def _member_answers(self) -> bool:
        """Whether the member the silent stream is open on still serves reads (so the silence is real)."""
        if self.endpoint is None:
            return False
        try:
            async with asyncio.timeout(self.store.timeout):
                await self._revision(self.endpoint)
        except (httpx.HTTPError, TimeoutError, ssl.SSLError, StoreError, ValueError):
            self._index += 1  # try the others first
            return False
        return True

    async def _take(self, line: str) -> None:
        """One line of the stream: its events become pending; a cancel reopens the watch."""
        try:
            data = json.loads(line)
        except ValueError:
            data = {"error": line[:200]}
        result = data.get("result") if isinstance(data, dict) else None
        if not isinstance(result, dict):  # an error line: the member gave up on the stream
            await self._connect()
            return
        if result.get("canceled"):
            compacted = _num(result.get("compact_revision"))
            if compacted > self.next_rev:
                self._pending.append(WatchEvent("resync", "", None, compacted))
                self.next_rev = compacted
            await self._connect()
            return
        skip = len(self.store.prefix.encode())
        for event in result.get("events") or []:
            kv = event.get("kv") or {}
            rev = _num(kv.get("mod_revision"))
            if event.get("type") == "DELETE":
                key = base64.b64decode(kv.get("key") or "")[skip:].decode()
                self._pending.append(WatchEvent("delete", key, None, rev))
            else:
                entry = self.store.entry(kv)
                self._pending.append(WatchEvent("put", entry.key, entry.value, rev))
            self.next_rev = rev + 1
