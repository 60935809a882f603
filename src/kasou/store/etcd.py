"""The cluster store: etcd v3, spoken through its JSON gateway with httpx.

:class:`EtcdStore` keeps the :class:`~kasou.store.base.Store` contract of the
SQLite store exactly: values are JSON objects, ``mod_rev`` is etcd's
``mod_revision``, and ``expect_rev`` (``0`` = "must not exist", ``n > 0`` =
"must still be at revision n") is checked and applied in one etcd
transaction. Every key lives under ``prefix`` (``/kasou/`` by default); the
prefix never shows in the keys this class returns.

Besides the store it offers leases and a minimal leader election, which the
HA work builds on::

    lease = await store.grant_lease(5)
    if await store.campaign("control", "host-a", lease):
        ...  # leader while keepalive(lease) keeps succeeding

The election key is ``<prefix>election/<name>`` and holds ``{"leader":
candidate}``, attached to the winner's lease: when the lease is revoked or
expires, etcd deletes the key and the next campaign can win.

Endpoints and failure
---------------------
Each request goes to one endpoint at a time (the last one that answered
first), each attempt bounded by ``timeout`` seconds. If an endpoint cannot be
reached the request moves on to the next, so losing a member that is not the
leader is invisible. A request that reached a member but got no answer in time
(or "etcdserver: request timed out"/"no leader") is *ambiguous*: it may yet be
applied. Reads, unconditional puts, lease calls and campaigns are safe to
repeat and go on to the next endpoint. So does a put or delete with
``expect_rev > 0``, since a revision never comes back and only one of the
attempts can pass the compare; but if the retry's compare then fails, the
earlier attempt may be the one that won, so it raises :class:`StoreError`
("may or may not have been applied"), not StoreConflict. Creates
(``expect_rev=0``, which a delete could make true again), plain deletes and
delete_prefix are not repeated: they raise that StoreError at once, as etcd's
own client does. If no endpoint answers, StoreError names them all. A call
takes at most ``len(endpoints) * timeout`` seconds.

The endpoints given are where the store starts; every ``SYNC_EVERY_S`` (and after
the first request that succeeds) it asks the cluster for its members and adds
their client URLs after the configured ones (and drops those of members
removed), as etcd's own client does with auto-sync. So the first host of a
cluster, configured when its etcd was the only member, fails over to the
members that joined later.

When the etcd *leader* dies, a follower keeps forwarding proposals to it until
it notices (one election timeout, 1 s by default) and the request is lost; etcd
answers it only after its own 7 s request timeout. Keep ``timeout`` above the
election time (default 5 s) so that the retry lands after a new leader is elected.

etcd 3.4 gateway quirks handled here: int64 fields (revisions, lease IDs,
TTLs, counts) arrive as JSON strings; fields equal to zero, false or empty
are left out (``succeeded``, ``kvs``, ``count``, ``deleted``, a lost lease's
``TTL``); ``lease/keepalive`` is a stream whose single answer is wrapped in
``{"result": ...}``; errors are ``{"error", "message", "code"}`` with a
gRPC code, and the minimum lease TTL is rounded up by the server (2 s with the
default election timeout).
"""

from __future__ import annotations

import asyncio
import base64
import json
import math
import ssl
import time
from typing import Any, Literal

import httpx

from kasou.errors import StoreConflict, StoreError
from kasou.store.base import Entry, Store, Watch
from kasou.store.etcdwatch import EtcdWatch

# gRPC codes the gateway reports that mean "this member cannot serve now, another may".
_UNAVAILABLE = 14
_NOT_FOUND = 5
_UNKNOWN = "the write may or may not have been applied"

_Retry = Literal["always", "never", "verify"]
SYNC_EVERY_S = 60.0  # how often the endpoints are learnt again from the cluster's member list


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: str | None) -> bytes:
    return base64.b64decode(text or "")


def _int(value: Any) -> int:
    """An int64 field of the 3.4 gateway: a string, or missing when zero."""
    return int(value or 0)


def range_end(prefix: bytes) -> bytes:
    """The etcd ``range_end`` that selects every key starting with ``prefix``.

    The prefix with its last byte incremented (dropping trailing 0xff bytes);
    ``b"\\0"`` (every key from ``prefix`` on) when no such key exists.
    """
    p = bytearray(prefix)
    while p and p[-1] == 0xFF:
        p.pop()
    if not p:
        return b"\0"
    p[-1] += 1
    return bytes(p)


REMOVE_WAIT_S = 30.0  # etcd counts a newly started member as active after 5 s


class _Unsent(Exception):
    """The request surely never reached a member: trying another one is always safe."""


class _Ambiguous(Exception):
    """The request may have reached a member, which did not answer in time."""


class EtcdStore(Store):
    """A :class:`Store` on an etcd v3 cluster (tested with etcd 3.4)."""

    def __init__(
        self,
        endpoints: list[str],
        *,
        prefix: str = "/kasou/",
        timeout: float = 5.0,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        """``tls``: the client context for ``https://`` endpoints (the site CA and this host's
        certificate: etcd with ``--client-cert-auth`` accepts only the site's hosts)."""
        if not endpoints:
            raise StoreError("the etcd store needs at least one endpoint")
        self.endpoints = [e.rstrip("/") for e in endpoints]
        if tls is None and any(e.startswith("https://") for e in self.endpoints):
            raise StoreError("etcd over https needs this host's TLS files (the site CA and its certificate)")
        self.prefix = prefix
        self.timeout = timeout
        self.tls = tls
        self._pfx = prefix.encode()
        self._preferred = 0  # index of the endpoint that answered last
        self._configured = list(self.endpoints)
        self._synced_at: float | None = None  # when the member list last gave the endpoints
        self._client = httpx.AsyncClient(timeout=httpx.Timeout(timeout), verify=tls if tls is not None else True)

    # -- transport -------------------------------------------------------------------------------------

    async def _call(self, path: str, body: dict[str, Any], *, retry: _Retry = "always") -> dict[str, Any]:
        """POST ``body`` to ``/v3/<path>`` on the first endpoint that answers; return the JSON reply."""
        reply, _ = await self._call_ex(path, body, retry=retry)
        return reply

    async def _call_ex(self, path: str, body: dict[str, Any], *, retry: _Retry) -> tuple[dict[str, Any], bool]:
        """Like :meth:`_call`; also says whether an earlier attempt may have been applied.

        ``retry`` says what to do when a member got the request but did not answer in time:
        ``always`` try the next endpoint (reads, and writes that may safely happen twice);
        ``never`` raise StoreError at once (the outcome is unknown); ``verify`` try the next
        endpoint and let the caller treat a failed compare as "outcome unknown".
        """
        n = len(self.endpoints)
        failures: list[str] = []
        ambiguous = False
        for i in range(n):
            index = (self._preferred + i) % n
            endpoint = self.endpoints[index]
            try:
                reply = await self._call_one(endpoint, path, body)
            except _Unsent as e:
                failures.append(f"{endpoint}: {e}")
                continue
            except _Ambiguous as e:
                if retry == "never":
                    raise StoreError(f"etcd at {endpoint} did not complete {path}: {e}; {_UNKNOWN}") from None
                ambiguous = True
                failures.append(f"{endpoint}: {e}")
                continue
            self._preferred = index
            if path != "cluster/member/list" and (
                self._synced_at is None or time.monotonic() - self._synced_at >= SYNC_EVERY_S
            ):
                await self.sync_endpoints()
            return reply, ambiguous
        unknown = f"; {_UNKNOWN}" if ambiguous and path != "kv/range" else ""
        raise StoreError(f"no etcd endpoint answered {path} ({'; '.join(failures)}){unknown}")

    async def _call_one(self, endpoint: str, path: str, body: dict[str, Any]) -> dict[str, Any]:
        try:
            async with asyncio.timeout(self.timeout):
                r = await self._client.post(f"{endpoint}/v3/{path}", json=body)
        except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout) as e:
            raise _Unsent(str(e) or type(e).__name__) from None
        except TimeoutError:
            raise _Ambiguous(f"no answer within {self.timeout:g}s") from None
        except ssl.SSLError as e:
            # Under TLS 1.3 a server that refuses our certificate says so after the client's first
            # write: the request never reached etcd. Any other TLS failure may have come after it.
            reason = f"TLS: {e.reason or e}"
            if "CERTIFICATE" in str(e.reason or "").upper():
                raise _Unsent(reason) from None
            raise _Ambiguous(reason) from None
        except httpx.TransportError as e:
            raise _Ambiguous(str(e) or type(e).__name__) from None
        try:
            # keepalive is a stream: one JSON object per line; we sent one request, so one answer.
            data = json.loads(r.text.strip().splitlines()[0]) if r.text.strip() else {}
        except ValueError:
            data = None
        if not isinstance(data, dict):
            raise StoreError(f"etcd at {endpoint} sent a reply to {path} that is not a JSON object")
        if r.status_code != 200 or "error" in data:
            # unary errors: {"error": "..", "message": "..", "code": n};
            # streamed ones: {"error": {"grpc_code": n, "message": ".."}}
            err = data.get("error")
            if isinstance(err, dict):
                code, message = _int(err.get("grpc_code")), str(err.get("message") or "")
            else:
                code, message = _int(data.get("code")), str(data.get("message") or err or "")
            message = message or f"HTTP {r.status_code}"
            if code == _UNAVAILABLE:  # no leader, request timed out, leader changed: another member may do
                raise _Ambiguous(message)
            raise StoreError(f"etcd at {endpoint} refused {path}: {message}", grpc_code=code)
        if "result" in data and isinstance(data["result"], dict):
            return dict(data["result"])
        return dict(data)

    # -- encoding --------------------------------------------------------------------------------------

    def _key(self, key: str) -> str:
        return _b64(self._pfx + key.encode())

    def entry(self, kv: dict[str, Any]) -> Entry:
        """The :class:`Entry` of an etcd ``KeyValue`` (base64 key and value, this store's prefix taken off)."""
        raw = _unb64(kv.get("key"))
        key = raw[len(self._pfx) :].decode()
        try:
            value = json.loads(_unb64(kv.get("value")))
        except ValueError:
            value = None
        if not isinstance(value, dict):
            raise StoreError(f"the value of {key} in etcd is not a JSON object")
        return Entry(key, value, _int(kv.get("mod_revision")))

    @staticmethod
    def _value(value: dict[str, Any]) -> str:
        return _b64(json.dumps(value, separators=(",", ":"), sort_keys=True, ensure_ascii=False).encode())

    def prefix_range(self, prefix: str) -> dict[str, str]:
        """The base64 ``key`` and ``range_end`` that select every key under ``prefix`` (in this store)."""
        full = self._pfx + prefix.encode()
        return {"key": _b64(full or b"\0"), "range_end": _b64(range_end(full))}

    def _compare(self, key: str, expect_rev: int) -> dict[str, Any]:
        if expect_rev == 0:
            return {"target": "CREATE", "key": self._key(key), "result": "EQUAL", "create_revision": "0"}
        return {"target": "MOD", "key": self._key(key), "result": "EQUAL", "mod_revision": str(expect_rev)}

    # -- Store -----------------------------------------------------------------------------------------

    async def get(self, key: str) -> Entry | None:
        reply = await self._call("kv/range", {"key": self._key(key)})
        kvs = reply.get("kvs") or []
        return self.entry(kvs[0]) if kvs else None

    async def range(self, prefix: str) -> list[Entry]:
        reply = await self._call(
            "kv/range", {**self.prefix_range(prefix), "sort_order": "ASCEND", "sort_target": "KEY"}
        )
        return [self.entry(kv) for kv in reply.get("kvs") or []]

    async def put(
        self, key: str, value: dict[str, Any], expect_rev: int | None = None, *, lease: int | None = None
    ) -> int:
        """Write ``value``; return the new revision. ``lease``: attach the key to that lease."""
        request: dict[str, Any] = {"key": self._key(key), "value": self._value(value)}
        if lease:
            request["lease"] = str(lease)
        if expect_rev is None:
            reply = await self._call("kv/put", request)
            return _int(reply.get("header", {}).get("revision"))
        # A revision never comes back, so "mod_revision == n > 0" can succeed at most once and the
        # txn may be retried elsewhere. "Must not exist" can become true again after a delete: not.
        reply, retried = await self._call_ex(
            "kv/txn",
            {"compare": [self._compare(key, expect_rev)], "success": [{"request_put": request}]},
            retry="verify" if expect_rev > 0 else "never",
        )
        if not reply.get("succeeded"):
            if retried:
                raise StoreError(f"writing {key}: an etcd member did not answer; {_UNKNOWN}", key=key)
            raise StoreConflict(f"{key} changed concurrently", key=key)
        return _int(reply.get("header", {}).get("revision"))

    async def delete(self, key: str, expect_rev: int | None = None) -> bool:
        if expect_rev is None:
            reply = await self._call("kv/deleterange", {"key": self._key(key)}, retry="never")
            return _int(reply.get("deleted")) > 0
        reply, retried = await self._call_ex(
            "kv/txn",
            {
                "compare": [self._compare(key, expect_rev)],
                "success": [{"request_delete_range": {"key": self._key(key)}}],
                "failure": [{"request_range": {"key": self._key(key), "count_only": True}}],
            },
            retry="verify",  # expect_rev 0 deletes nothing; n > 0 can succeed only once
        )
        responses = reply.get("responses") or [{}]
        if reply.get("succeeded"):
            return _int(responses[0].get("response_delete_range", {}).get("deleted")) > 0
        if retried and expect_rev > 0:
            raise StoreError(f"deleting {key}: an etcd member did not answer; {_UNKNOWN}", key=key)
        if _int(responses[0].get("response_range", {}).get("count")) == 0:
            return False  # like SqliteStore: a missing key is "not deleted", not a conflict
        raise StoreConflict(f"{key} changed concurrently", key=key)

    async def delete_prefix(self, prefix: str) -> int:
        reply = await self._call("kv/deleterange", self.prefix_range(prefix), retry="never")
        return _int(reply.get("deleted"))

    async def close(self) -> None:
        await self._client.aclose()

    def watch(self, prefix: str) -> Watch:
        """An etcd watch (``/v3/watch``) on ``prefix``: :class:`kasou.store.etcdwatch.EtcdWatch`."""
        return EtcdWatch(self, prefix)

    # -- leases ----------------------------------------------------------------------------------------

    async def grant_lease(self, ttl_s: float) -> int:
        """A new lease of ``ttl_s`` seconds (rounded up; etcd raises it to its minimum); its ID."""
        reply = await self._call("lease/grant", {"TTL": str(max(1, math.ceil(ttl_s)))})
        return _int(reply.get("ID"))

    async def keepalive(self, lease_id: int) -> float:
        """Renew the lease; its remaining TTL in seconds. StoreError if it has expired or was revoked.

        Sent to every member at once (a renewal is idempotent): the first positive TTL wins, so a
        member that hangs while it restarts or catches up costs no time. "Expired" (TTL 0) is
        believed only if no member renews it.
        """
        body = {"ID": str(lease_id)}

        async def one(endpoint: str) -> tuple[dict[str, Any] | None, str]:
            try:
                return await self._call_one(endpoint, "lease/keepalive", body), ""
            except (_Unsent, _Ambiguous) as e:
                return None, f"{endpoint}: {e}"
            except StoreError as e:
                return None, f"{endpoint}: {e.message}"

        tasks = [asyncio.create_task(one(e)) for e in self.endpoints]
        failures: list[str] = []
        expired = False
        try:
            for done in asyncio.as_completed(tasks):
                reply, why = await done
                if reply is None:
                    failures.append(why)
                    continue
                ttl = _int(reply.get("TTL"))
                if ttl > 0:
                    return float(ttl)
                expired = True
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        if expired:
            raise StoreError(f"etcd lease {lease_id:x} has expired or was revoked", lease=lease_id)
        raise StoreError(f"no etcd endpoint answered lease/keepalive ({'; '.join(failures)})")

    async def revoke(self, lease_id: int) -> None:
        """End the lease now, deleting its keys. A lease that is already gone is not an error."""
        try:
            await self._call("lease/revoke", {"ID": str(lease_id)})
        except StoreError as e:
            if e.details.get("grpc_code") != _NOT_FOUND:
                raise

    # -- leader election -------------------------------------------------------------------------------

    def _election_key(self, name: str) -> str:
        return f"election/{name}"

    async def campaign(self, name: str, candidate: str, lease_id: int) -> bool:
        """Try to become leader of ``name``; True if ``candidate`` now leads under ``lease_id``.

        One transaction: if ``<prefix>election/<name>`` does not exist, put it with the lease.
        Leadership lasts as long as the lease. Campaigning again while already leader under
        the same lease returns True (so a retried campaign does not lose to itself).
        """
        key = self._election_key(name)
        reply = await self._call(
            "kv/txn",
            {
                "compare": [self._compare(key, 0)],
                "success": [
                    {
                        "request_put": {
                            "key": self._key(key),
                            "value": self._value({"leader": candidate}),
                            "lease": str(lease_id),
                        }
                    }
                ],
                "failure": [{"request_range": {"key": self._key(key)}}],
            },
        )
        if reply.get("succeeded"):
            return True
        kvs = (reply.get("responses") or [{}])[0].get("response_range", {}).get("kvs") or []
        return bool(
            kvs and _int(kvs[0].get("lease")) == lease_id and self.entry(kvs[0]).value.get("leader") == candidate
        )

    async def leader(self, name: str) -> str | None:
        """The current leader of ``name``, or None if nobody leads."""
        entry = await self.get(self._election_key(name))
        return None if entry is None else str(entry.value.get("leader"))

    # -- cluster membership (kasou cluster join / leave) ------------------------------------------------

    @staticmethod
    def _member(m: dict[str, Any]) -> dict[str, Any]:
        return {
            "id": _int(m.get("ID")),
            "name": str(m.get("name") or ""),  # empty for a member added but not started yet
            "peer_urls": list(m.get("peerURLs") or []),
            "client_urls": list(m.get("clientURLs") or []),
        }

    async def sync_endpoints(self) -> list[str]:
        """Learn the endpoints from the cluster's members: the configured ones first, then the other members'
        client URLs (of the same scheme); a removed member's URL is dropped unless configured. Best effort: if
        the member list cannot be read, the endpoints stay as they are (tried again after ``SYNC_EVERY_S``)."""
        self._synced_at = time.monotonic()
        try:
            members = await self.member_list()
        except StoreError:
            return self.endpoints
        schemes = {e.split("://", 1)[0] for e in self._configured}
        learnt = [
            u.rstrip("/")
            for m in members
            for u in m["client_urls"]
            if u.split("://", 1)[0] in schemes and u.rstrip("/") not in self._configured
        ]
        current = self.endpoints[self._preferred] if self._preferred < len(self.endpoints) else None
        self.endpoints = [*self._configured, *dict.fromkeys(learnt)]
        self._preferred = self.endpoints.index(current) if current in self.endpoints else 0
        return self.endpoints

    async def member_list(self) -> list[dict[str, Any]]:
        """The cluster's members: ``id``, ``name``, ``peer_urls``, ``client_urls``."""
        reply = await self._call("cluster/member/list", {})
        return [self._member(m) for m in reply.get("members") or []]

    async def member_add(self, peer_urls: list[str]) -> tuple[int, list[dict[str, Any]]]:
        """Add a member (etcd's ``member add``: the new member then starts with
        ``--initial-cluster-state existing``); its id and the members after the change. Not repeated on
        an unclear answer: a second add would make a second member."""
        reply = await self._call("cluster/member/add", {"peerURLs": peer_urls}, retry="never")
        added = self._member(reply.get("member") or {})
        return added["id"], [self._member(m) for m in reply.get("members") or []]

    async def member_remove(self, member_id: int) -> list[dict[str, Any]]:
        """Remove a member (it shuts itself down); the members left. etcd refuses the removal ("unhealthy
        cluster", before applying anything) while a member started in the last seconds is not yet counted as
        active: that refusal is asked again, for at most ``REMOVE_WAIT_S``."""
        deadline = time.monotonic() + REMOVE_WAIT_S
        while True:
            try:
                reply = await self._call("cluster/member/remove", {"ID": str(member_id)}, retry="never")
            except StoreError as e:
                if "unhealthy cluster" not in str(e) or time.monotonic() > deadline:
                    raise
                await asyncio.sleep(1.0)
                continue
            return [self._member(m) for m in reply.get("members") or []]
