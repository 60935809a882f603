"""Which control plane is active: leader election on etcd, lease-based.

Every host may run a control plane. Each campaigns for ``election/control``
with a lease it keeps alive; the winner runs jobs, the reconciler (and HA).
If its host dies, its lease expires within the TTL and another candidate wins
at its next campaign (every second). The election value names the leader's
API address so the others can forward changes to it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import Awaitable, Callable

from kasou.errors import KasouError
from kasou.store.etcd import EtcdStore

log = logging.getLogger(__name__)

ELECTION = "control"
DEFAULT_TTL_S = 5.0


class Leadership:
    def __init__(
        self,
        store: EtcdStore,
        host: str,
        api_url: str,
        on_elected: Callable[[], Awaitable[None]],
        on_deposed: Callable[[], Awaitable[None]],
        ttl_s: float = DEFAULT_TTL_S,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.store = store
        # Forwarding to the leader: the site CA verifies it, and this host's certificate is presented.
        self.tls: ssl.SSLContext | bool = tls if tls is not None else True
        self.host = host
        self.api_url = api_url
        self.on_elected = on_elected
        self.on_deposed = on_deposed
        self.ttl_s = ttl_s
        self.is_leader = False
        self.leader_host: str | None = None
        self.leader_url: str | None = None
        self._lease: int | None = None

    @property
    def _me(self) -> str:
        return f"{self.host} {self.api_url}"

    async def run(self) -> None:
        while True:
            try:
                if self.is_leader:
                    assert self._lease is not None
                    await self.store.keepalive(self._lease)
                    await asyncio.sleep(self.ttl_s / 3)
                    continue
                if self._lease is None:
                    self._lease = await self.store.grant_lease(self.ttl_s)
                if await self.store.campaign(ELECTION, self._me, self._lease):
                    self.is_leader = True
                    self.leader_host, self.leader_url = self.host, self.api_url
                    log.info("%s is now the control plane leader", self.host)
                    await self.on_elected()
                    continue
                current = await self.store.leader(ELECTION)
                if current:
                    self.leader_host, _, self.leader_url = current.partition(" ")
                else:
                    self.leader_host = self.leader_url = None
                # Our own lease must stay alive while we wait, or the next campaign fails.
                await self.store.keepalive(self._lease)
            except asyncio.CancelledError:
                raise
            except KasouError as e:
                log.warning("leader election on %s: %s", self.host, e.message)
                if self.is_leader:
                    await self._step_down()
                self._lease = None
            await asyncio.sleep(1.0)

    async def _step_down(self) -> None:
        self.is_leader = False
        self.leader_host = self.leader_url = None
        log.warning("%s lost the control plane leadership", self.host)
        with contextlib.suppress(Exception):
            await self.on_deposed()

    async def resign(self) -> None:
        if self._lease is not None:
            with contextlib.suppress(KasouError):
                await self.store.revoke(self._lease)
        self._lease = None
        self.is_leader = False
