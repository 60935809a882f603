"""Who may join the cluster, and its etcd members: join tokens and ``member add``/``remove``.

A join token (:class:`kasou.model.cluster.JoinToken`) is made by an administrator (``kasou cluster init``
makes the first, ``kasou cluster token`` more), lives one hour by default (at most a day) and works once.
The store keeps ``cluster/join-tokens/<id>``: the SHA-256 of its secret (never the secret), when it
expires, who made it, and once used, by which host and when. A join claims its token first (a
compare-and-swap: two hosts with one token cannot both win) and gives it back if the join then fails.

The etcd side is a :class:`Membership` (the :class:`~kasou.store.etcd.EtcdStore` is one): a host joins as
etcd's own procedure has it, ``member add`` of its peer URL first, then the new member starts with
``--initial-cluster-state existing``.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import secrets
import time
from collections.abc import Callable
from typing import Any, Protocol

from kasou.errors import Conflict, InvalidSpec, StoreConflict, StoreError, Unauthorized
from kasou.model.cluster import ETCD_PEER_PORT, REMOVED_PREFIX, JoinToken, Member, url
from kasou.store.base import Store

TOKENS = "cluster/join-tokens/"
ADD_WAIT_S = 30.0  # how long a join waits for etcd to take a new member (the join request allows 60 s)
ADD_RETRY_S = 1.0


async def removed_hosts(store: Store) -> set[str]:
    """The hosts taken out of the cluster while down (``kasou cluster remove``) and not joined again since."""
    return {e.key.removeprefix(REMOVED_PREFIX) for e in await store.range(REMOVED_PREFIX)}


async def mark_removed(store: Store, host: str, by: str) -> None:
    await store.put(REMOVED_PREFIX + host, {"host": host, "at": time.time(), "by": by})


async def clear_removed(store: Store, host: str) -> dict[str, Any] | None:
    """A host of this name joins again: it counts from now on. The record it had, if any (to put back)."""
    e = await store.get(REMOVED_PREFIX + host)
    if e is None:
        return None
    await store.delete(e.key)
    return dict(e.value)


async def restore_removed(store: Store, record: dict[str, Any] | None) -> None:
    """After a failed join: the name is removed again, as it was."""
    if record is not None:
        await store.put(REMOVED_PREFIX + str(record["host"]), record)


class Membership(Protocol):
    async def member_list(self) -> list[dict[str, Any]]: ...

    async def member_add(self, peer_urls: list[str]) -> tuple[int, list[dict[str, Any]]]: ...

    async def member_remove(self, member_id: int) -> list[dict[str, Any]]: ...


def _digest(secret: str) -> str:
    return hashlib.sha256(b"kasou-join-token\0" + secret.encode()).hexdigest()


def members_of(raw: list[dict[str, Any]], new_name: str | None = None) -> list[Member]:
    """etcd's members as :class:`Member`; one without a name yet (added, not started) is ``new_name``."""
    out = []
    for m in raw:
        name = m.get("name") or new_name or f"unstarted-{int(m.get('id') or 0):x}"
        peers, clients = m.get("peer_urls") or [""], m.get("client_urls") or []
        out.append(Member(name=name, peer_url=peers[0], client_url=clients[0] if clients else None))
    return out


class JoinTokens:
    def __init__(self, store: Store, clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.clock = clock

    async def create(self, ca_sha256: str, ttl_s: float, by: str) -> tuple[JoinToken, float]:
        """A new token for the site whose CA has fingerprint ``ca_sha256``; expired ones are dropped."""
        now = self.clock()
        for e in await self.store.range(TOKENS):
            if float(e.value.get("expires", 0)) < now - 86400:  # kept a day after expiry, for the record
                await self.store.delete(e.key, expect_rev=e.mod_rev)
        token = JoinToken(id=secrets.token_hex(4), secret=secrets.token_urlsafe(24), ca_sha256=ca_sha256)
        expires = now + ttl_s
        await self.store.create(
            TOKENS + token.id,
            {"sha256": _digest(token.secret), "expires": expires, "created": now, "by": by, "used": None},
        )
        return token, expires

    async def claim(self, text: str, ca_sha256: str, host: str) -> JoinToken:
        """Take a token for ``host``'s join, once: Unauthorized if it is unknown, wrong, expired or used, or
        names another CA than this site's."""
        token = JoinToken.parse(text)
        if token.ca_sha256 != ca_sha256:
            raise Unauthorized("the join token names another CA than this site's: a token of another site, or "
                               "this is not the host that made it")  # fmt: skip
        entry = await self.store.get(TOKENS + token.id)
        if entry is None or not hmac.compare_digest(str(entry.value.get("sha256", "")), _digest(token.secret)):
            raise Unauthorized("the join token is not valid here (make one with: kasou cluster token)")
        rec = dict(entry.value)
        if rec.get("used"):
            used = rec["used"]
            raise Unauthorized(f"the join token was used already (by host {used.get('host')} at "
                               f"{time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime(used.get('at', 0)))} UTC); "
                               "a token works once: make a new one with kasou cluster token")  # fmt: skip
        if self.clock() > float(rec.get("expires", 0)):
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(float(rec.get("expires", 0))))
            raise Unauthorized(f"the join token expired at {when} UTC; make a new one with kasou cluster token")
        rec["used"] = {"host": host, "at": self.clock()}
        try:
            await self.store.put(entry.key, rec, expect_rev=entry.mod_rev)
        except StoreConflict:
            raise Unauthorized("the join token is being used by another host at this moment") from None
        return token

    async def give_back(self, token: JoinToken) -> None:
        """After a failed join: the token works again (until it expires)."""
        entry = await self.store.get(TOKENS + token.id)
        if entry is not None:
            await self.store.put(entry.key, {**entry.value, "used": None}, expect_rev=entry.mod_rev)


async def add_member(members: Membership, name: str, address: str) -> list[Member]:
    """``member add`` of the host's peer URL: refused if a member of that name or URL exists."""
    peer = url(address, ETCD_PEER_PORT)
    for m in members_of(await members.member_list()):
        if m.name == name or m.peer_url == peer:
            raise Conflict(f"the cluster has an etcd member {m.name} at {m.peer_url} already: a host joins once "
                           "(kasou cluster leave on it first, or give this host another name or address)")  # fmt: skip
    deadline = time.monotonic() + ADD_WAIT_S
    while True:
        try:
            _, after = await members.member_add([peer])
            return members_of(after, new_name=name)
        except StoreError as e:
            # etcd refuses to add a member until every member has been up for a few seconds (its strict
            # reconfiguration check), before it proposes anything: nothing was added, so asking again is safe.
            if "unhealthy cluster" not in e.message:
                raise
            if time.monotonic() >= deadline:
                raise Conflict(f"etcd refused a new member for {ADD_WAIT_S:.0f} s: {e.message.split(';')[0]} (a "
                               "member that joined or restarted moments ago is not counted yet); join again in a "
                               "minute") from None  # fmt: skip
            await asyncio.sleep(ADD_RETRY_S)


async def remove_member(members: Membership, name: str) -> list[Member]:
    """``member remove`` of the host's member; refused for the last one (there is no cluster without it)."""
    raw = await members.member_list()
    mine = [m for m in raw if m.get("name") == name]
    if not mine:
        raise InvalidSpec(f"the cluster has no etcd member named {name}", field="host")
    if len(raw) == 1:
        raise Conflict(f"{name} holds the cluster's only etcd member: the last host cannot leave its own cluster")
    return members_of(await members.member_remove(int(mine[0]["id"])))
