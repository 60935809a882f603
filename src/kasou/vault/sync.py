"""A second site's copy: pull, over a primary backup server's reader API, every generation this server
lacks (docs/backup-server.md, "Verify, sync, export").

Chunks first, each checked against the SHA-256 the primary stored for it (and sent beside it) before it
is kept; then the index, added under this server's own policy and lock. The primary is only read: it
cannot delete or change anything here, and nothing here writes to it.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import httpx

from kasou.errors import BackupCorrupt, InvalidSpec, KasouError
from kasou.model.names import validate_name
from kasou.vault import policy, tlscert
from kasou.vault.client import is_loopback
from kasou.vault.index import MAGIC, MAX_BLOB, STATE_KEYS, chunk_ids, validate_index
from kasou.vault.store import Store
from kasou.wire import raise_for_response

TIMEOUT_S = 60.0


class Primary:
    """The few calls a sync makes to a primary server's API (read only)."""

    def __init__(self, url: str, token: str, fingerprint: str | None, timeout: float = TIMEOUT_S,
                 transport: httpx.BaseTransport | None = None) -> None:  # fmt: skip
        parts = urlsplit(url)
        if parts.scheme not in ("https", "http") or not parts.hostname:
            raise InvalidSpec(f"{url!r} is not an https:// URL of a backup server", field="from")
        verify: Any = True
        if transport is None and parts.scheme == "https":
            if not fingerprint:
                raise InvalidSpec("give the primary's certificate fingerprint (--fingerprint)", field="fingerprint")
            verify = tlscert.pinned_context(parts.hostname, parts.port or 443, fingerprint, timeout=min(timeout, 15))
        elif transport is None and not is_loopback(parts.hostname):
            raise InvalidSpec("plain http only to a server on this machine's loopback", field="from")
        self.url = url.rstrip("/")
        self.http = httpx.Client(
            base_url=self.url, headers={"Authorization": f"Bearer {token}"}, verify=verify,
            timeout=httpx.Timeout(timeout), transport=transport,
        )  # fmt: skip

    def close(self) -> None:
        self.http.close()

    def _get(self, path: str, **params: Any) -> httpx.Response:
        resp = self.http.get(path, params=params or None)
        raise_for_response(resp)
        return resp

    def info(self) -> dict[str, Any]:
        data: dict[str, Any] = self._get("/v1/info").json()
        return data

    def generations(self, vm: str | None = None) -> list[dict[str, Any]]:
        data: list[dict[str, Any]] = self._get("/v1/generations", **({"vm": vm} if vm else {})).json()
        return data

    def generation(self, vm: str, generation: int) -> dict[str, Any]:
        data: dict[str, Any] = self._get(f"/v1/generations/{vm}/{generation}").json()
        return data

    def confirm(self, vm: str, generation: int) -> None:
        """Tell the primary this site holds a verified copy (its ``copied_to``); the only call that writes."""
        raise_for_response(self.http.post(f"/v1/generations/{vm}/{generation}/copied"))

    def chunk(self, chunk_id: str) -> bytes:
        """A chunk's blob, refused unless it hashes to the SHA-256 the primary stored for it."""
        resp = self._get(f"/v1/chunks/{chunk_id}")
        blob = resp.content
        want = resp.headers.get("x-kasou-chunk-sha256", "")
        if len(blob) > MAX_BLOB or not blob.startswith(MAGIC):
            raise BackupCorrupt(f"the primary sent chunk {chunk_id} not as a sealed blob", chunk=chunk_id)
        if not hmac.compare_digest(hashlib.sha256(blob).hexdigest(), want.lower()):
            raise BackupCorrupt(f"chunk {chunk_id} does not match the SHA-256 the primary holds for it",
                                chunk=chunk_id)  # fmt: skip
        return blob


@dataclass
class SyncResult:
    primary: str
    added: list[tuple[str, int]] = field(default_factory=list)
    chunks: int = 0
    chunk_bytes: int = 0
    failed: list[tuple[str, int, str]] = field(default_factory=list)  # vm, generation, why
    unconfirmed: list[tuple[str, int, str]] = field(default_factory=list)  # copied, the primary not told: why


def sync(store: Store, primary: Primary, vm: str | None = None,
         progress: Callable[[str], None] | None = None) -> SyncResult:  # fmt: skip
    """Pull every generation of the primary (of ``vm``) this server does not hold. A generation that cannot
    be copied (a damaged chunk on the primary) is skipped and reported; the others are still copied."""
    if vm is not None:
        validate_name(vm, "vm")
    info = primary.info()
    source = {"server_id": info["server_id"], "url": primary.url}
    res = SyncResult(primary=primary.url)
    for g in primary.generations(vm):
        name, gen = g["vm"], g["generation"]
        validate_name(name, "vm")
        if store.has_generation(name, gen):
            if not g.get("copied_to"):  # held, but the primary has not heard so (a receipt lost earlier)
                _confirm(store, primary, res, name, gen)
            continue
        try:
            full = primary.generation(name, gen)
            index = validate_index({k: v for k, v in full.items() if k not in STATE_KEYS})
            if index["vm"] != name or index["generation"] != gen:
                raise BackupCorrupt(f"the primary's generation {gen} of {name} names another one")
            for cid in store.missing(sorted(chunk_ids(index))):
                blob = primary.chunk(cid)
                if store.put_chunk(cid, blob):
                    res.chunks += 1
                    res.chunk_bytes += len(blob)
            # the primary's time of receipt travels with it: "newest before the attack" means the same on both sites
            first = (full.get("synced_from") or {}).get("received")  # the primary may itself hold a copy
            received = first if isinstance(first, (int, float)) else full.get("received")
            received = received if isinstance(received, (int, float)) else None
            policy.add_generation(store, index, synced_from={**source, "at": store.clock(), "received": received})
        except KasouError as e:
            res.failed.append((name, gen, e.message))
            store.event("sync_failed", vm=name, generation=gen, primary=primary.url, reason=e.message)
            continue
        res.added.append((name, gen))
        store.event("synced", vm=name, generation=gen, primary=primary.url, primary_id=info["server_id"])
        _confirm(store, primary, res, name, gen)
        if progress:
            progress(f"{name} generation {gen}")
    return res


def _confirm(store: Store, primary: Primary, res: SyncResult, vm: str, generation: int) -> None:
    """The receipt to the primary; one that fails is reported (the next sync sends it again), never fatal."""
    try:
        primary.confirm(vm, generation)
    except (KasouError, httpx.HTTPError) as e:
        why = e.message if isinstance(e, KasouError) else f"{type(e).__name__}: {e}"
        res.unconfirmed.append((vm, generation, why))
        store.event("copy_unconfirmed", vm=vm, generation=generation, primary=primary.url, reason=why)
