"""Revoking a host's certificates when it leaves or is removed: no connection of the old machine is taken again.

The store keeps, for each host that joined through the site CA (``POST /v1/cluster/join``), the serial numbers
of the two certificates signed for it then (its host certificate and its etcd member's), under
``cluster/certs/<host>``. ``kasou cluster leave`` and ``kasou cluster remove`` revoke them: one record per
certificate under ``cluster/revoked/<serial>`` (the host, when, by whom, until when the certificate would have
been valid). Two places then refuse them:

* the agents, and the leader for the calls followers forward (:class:`kasou.peers.KasouPeers`), read the revoked
  serials from the store (at most every ``kasou.peers.REVOKED_FRESH_S``) and answer a revoked client certificate
  403;
* etcd, which reads a certificate revocation list at each new connection (``--client-crl-file`` and
  ``--peer-crl-file``, written by ``kasou cluster init`` and ``join``). Only the host that holds the CA's key can
  sign that list: its API server (:class:`Revocations`) signs a new one into the store (``cluster/crl``) when
  the revoked serials change, and every API server writes the store's list to its own host's file. Each follows
  ``cluster/`` with a watch, so both happen within moments of the revocation, whichever host recorded it.

A host set up by hand (the hospital's own CA, ``docs/operations.md``) has no recorded serials: nothing is revoked
for it, and leave and remove say so.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from pathlib import Path

from kasou import pki
from kasou.control.background import BackgroundTask
from kasou.errors import KasouError, StoreConflict
from kasou.model.cluster import CERTS_PREFIX, CRL_KEY, REVOKED_PREFIX, RevocationState, revoked_serial
from kasou.store.base import Store

log = logging.getLogger(__name__)

EVERY_S = 10.0  # how often an API server looks for new revocations (the CA's host) and a new list (every host)


async def record_issued(store: Store, host: str, certificates: list[bytes]) -> None:
    """The certificates the site CA signed for ``host`` at its join (PEM): what leave and remove revoke."""
    serials, not_after = [], 0.0
    for pem in certificates:
        serials.append(format(pki.serial_of(pem), "x"))
        not_after = max(not_after, pki.not_after_of(pem))
    await store.put(CERTS_PREFIX + host, {"host": host, "serials": serials, "not_after": not_after, "at": time.time()})


async def revoke_host(store: Store, host: str, by: str) -> list[str]:
    """Revoke the certificates recorded for ``host`` (their serials, hex); none recorded: an empty list."""
    e = await store.get(CERTS_PREFIX + host)
    if e is None:
        return []
    serials = [str(s) for s in e.value.get("serials") or []]
    for serial in serials:
        await store.put(REVOKED_PREFIX + serial, {"host": host, "at": time.time(), "by": by,
                                           "not_after": e.value.get("not_after")})  # fmt: skip
    await store.delete(e.key)
    return serials


async def revoked_serials(store: Store) -> set[int]:
    return {revoked_serial(e.key) for e in await store.range(REVOKED_PREFIX)}


async def prune_expired(store: Store, now: float | None = None) -> int:
    """Forget the revocations of certificates that have expired since (no one can use them): the list stays
    short over the years. How many were forgotten."""
    now = time.time() if now is None else now
    gone = 0
    for e in await store.range(REVOKED_PREFIX):
        not_after = e.value.get("not_after")
        if not_after is not None and float(not_after) < now:
            await store.delete(e.key, expect_rev=e.mod_rev)
            gone += 1
    return gone


def write_file(path: Path, data: bytes) -> bool:
    """Write ``data`` to ``path`` in one step (etcd may read it at any moment); False if it was there already."""
    with contextlib.suppress(OSError):
        if path.read_bytes() == data:
            return False
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_bytes(data)
    tmp.chmod(0o644)
    os.replace(tmp, path)
    return True


async def sign_if_changed(store: Store, ca_dir: Path) -> bool:
    """Sign a new list into the store (with the CA in ``ca_dir``) when the revoked serials are not the stored
    list's; the revocations of certificates expired since are forgotten first. False when nothing changed."""
    await prune_expired(store)
    revoked = await revoked_serials(store)
    e = await store.get(CRL_KEY)
    listed = {int(s, 16) for s in (e.value.get("serials") or [])} if e is not None else None
    if listed == revoked:
        return False
    number = int(e.value.get("number", 0)) + 1 if e is not None else 1
    pem = pki.make_crl(ca_dir, revoked, number)
    value = {"pem": pem.decode(), "number": number, "serials": sorted(format(s, "x") for s in revoked),
             "at": time.time()}  # fmt: skip
    try:
        await store.put(CRL_KEY, value, expect_rev=e.mod_rev if e is not None else 0)
    except StoreConflict:
        return False  # another signer was quicker: the next round compares again
    log.info("revocation list %d signed: %d certificate(s) revoked", number, len(revoked))
    return True


async def current_crl(store: Store, ca_dir: Path) -> bytes:
    """The site's revocation list (PEM) for a joining host's etcd: the store's, signed now (by the CA in
    ``ca_dir``, this host's) if it is missing or behind the revoked serials."""
    await sign_if_changed(store, ca_dir)
    e = await store.get(CRL_KEY)
    if e is None:
        raise KasouError("the revocation list could not be signed into the store")
    return str(e.value["pem"]).encode()


async def state(store: Store) -> RevocationState:
    e = await store.get(CRL_KEY)
    revoked = len(await revoked_serials(store))
    if e is None:
        return RevocationState(revoked=revoked)
    return RevocationState(revoked=revoked, list_number=int(e.value.get("number", 0)),
                           listed=len(e.value.get("serials") or []), signed_at=e.value.get("at"))  # fmt: skip


class Revocations:
    """On every API server of a cluster: signs the list when this host holds the CA's key (``ca_dir``), and writes
    the store's list to this host's etcd file (``crl_file``)."""

    def __init__(self, store: Store, ca_dir: Path | None, crl_file: Path | None) -> None:
        self.store = store
        self.ca_dir = ca_dir if ca_dir is not None and (ca_dir / "ca.key").is_file() else None
        self.crl_file = crl_file
        self._background = BackgroundTask("revocations")
        self._wake = asyncio.Event()

    async def sign_if_changed(self) -> bool:
        """The CA's host: a new list in the store when the revoked serials are not the stored list's."""
        return await sign_if_changed(self.store, self.ca_dir) if self.ca_dir is not None else False

    async def write_local(self) -> bool:
        """Every host: this host's etcd reads the store's list (a missing file would make etcd refuse everyone:
        only a list read from the store is written, never an empty one made up)."""
        if self.crl_file is None:
            return False
        e = await self.store.get(CRL_KEY)
        if e is None:
            return False
        return write_file(self.crl_file, str(e.value["pem"]).encode())

    async def round(self) -> None:
        await self.sign_if_changed()
        await self.write_local()

    def nudge(self) -> None:
        """A revocation was just recorded: look now, not at the next round."""
        self._wake.set()

    async def _loop(self, every: float) -> None:
        while True:
            try:
                await self.round()
            except (KasouError, OSError, ValueError) as e:
                log.warning("the revocation list: %s", getattr(e, "message", e))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), every)
            self._wake.clear()

    async def _follow(self) -> None:
        """Look at once when a serial is revoked or the list changes, whichever host recorded it (a watch of
        ``cluster/``); the rounds every ``EVERY_S`` stay, for the changes a broken watch missed."""
        while True:
            try:
                async with self.store.watch("cluster/") as changes:
                    async for event in changes:
                        if event.key.startswith(REVOKED_PREFIX) or event.key == CRL_KEY or event.kind == "resync":
                            self.nudge()
            except KasouError as e:
                log.warning("following the revocations: %s; looking every %.0f s meanwhile", e.message, EVERY_S)
            await asyncio.sleep(EVERY_S)

    async def _run(self, every: float) -> None:
        await asyncio.gather(self._loop(every), self._follow())

    def start(self, every: float = EVERY_S) -> None:
        self._background.start(lambda: self._run(every))

    async def close(self) -> None:
        await self._background.close()
