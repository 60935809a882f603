"""A host's presence in the cluster: its record in etcd, held by a lease the agent keeps alive.

The record ``hosts/<name>`` says where the agent listens and what the host
offers. It lives as long as the agent renews its lease (every third of the
TTL), so a host whose agent dies or is cut off disappears from the cluster
after at most the TTL: this is the liveness the scheduler and HA rely on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

from kasou.errors import KasouError
from kasou.store.etcd import EtcdStore

log = logging.getLogger(__name__)

DEFAULT_TTL_S = 10.0


def host_key(name: str) -> str:
    return f"hosts/{name}"


class Registration:
    def __init__(self, store: EtcdStore, host: str, record: dict[str, Any], ttl_s: float = DEFAULT_TTL_S) -> None:
        self.store = store
        self.host = host
        self.record = record
        self.ttl_s = ttl_s
        self.lease: int | None = None
        self.last_renewed: float | None = None  # monotonic

    async def _register(self) -> None:
        self.lease = await self.store.grant_lease(self.ttl_s)
        value = {**self.record, "name": self.host, "registered_at": time.time()}
        await self.store.put(host_key(self.host), value, lease=self.lease)
        self.last_renewed = time.monotonic()
        log.info("host %s registered (lease %x, ttl %.0f s)", self.host, self.lease, self.ttl_s)

    async def run(self) -> None:
        """Register, then renew forever; re-register after a lapse."""
        while True:
            try:
                if self.lease is None:
                    await self._register()
                else:
                    await self.store.keepalive(self.lease)
                    self.last_renewed = time.monotonic()
            except asyncio.CancelledError:
                raise
            except KasouError as e:
                log.warning("host %s: lease renewal failed: %s", self.host, e.message)
                # If the lease may have expired, start over with a new one.
                if self.last_renewed is None or time.monotonic() - self.last_renewed > self.ttl_s:
                    self.lease = None
            await asyncio.sleep(self.ttl_s / 3)

    async def withdraw(self) -> None:
        """Leave the cluster at once (a clean shutdown of the agent)."""
        if self.lease is not None:
            with contextlib.suppress(KasouError):
                await self.store.revoke(self.lease)
            self.lease = None
