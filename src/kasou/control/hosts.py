"""The hosts the control plane knows: their agents, whether they are up, and maintenance.

On one host the directory is fixed (the local agent on its unix socket). In a
cluster it follows the ``hosts/<name>`` records the agents keep alive in etcd
(kept by the host guard, :mod:`kasou.agent.guard`): a host whose record is gone is down.
Maintenance is the control plane's own flag, ``hostflags/<name>``.
"""

from __future__ import annotations

import ssl
import time
from typing import Any

from pydantic import BaseModel

from kasou.agent.client import AgentClient
from kasou.control.membership import removed_hosts
from kasou.errors import AgentUnavailable
from kasou.store.base import Store

REFRESH_EVERY_S = 0.5
REMOVED_EVERY_S = 5.0  # how often the removed hosts are read again (this control plane forgets at once: forget())


class HostView(BaseModel):
    name: str
    state: str  # up, down, maintenance
    address: str | None = None
    cpus: int = 0
    memory_total_mib: int = 0
    memory_capacity_mib: int = 0  # what VMs may use (total minus the host's reserve)
    memory_used_mib: int = 0  # by running VMs, with QEMU's overhead
    memory_free_mib: int = 0
    vcpus_used: int = 0
    vms_running: int = 0
    load_1m: float = 0.0
    accelerator: str | None = None
    maintenance: bool = False


class Agents:
    """Agent clients by host name; static on one host, discovered from the store in a cluster."""

    def __init__(
        self,
        clients: dict[str, AgentClient] | None = None,
        store: Store | None = None,
        records: dict[str, dict[str, Any]] | None = None,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self._tls = tls  # agents on TCP: the site CA, and this host's certificate presented (mutual TLS)
        self._clients: dict[str, AgentClient] = dict(clients or {})
        self._urls: dict[str, str] = {}
        self._records: dict[str, dict[str, Any]] = dict(records or {})
        self._store = store
        self._up: set[str] = set(self._clients)
        self._known: set[str] = set(self._clients)
        self._refreshed = 0.0
        self._removed: set[str] = set()
        self._removed_read = -REMOVED_EVERY_S

    @property
    def clustered(self) -> bool:
        return self._store is not None

    async def refresh(self, force: bool = False) -> None:
        if self._store is None or (not force and time.monotonic() - self._refreshed < REFRESH_EVERY_S):
            return
        self._refreshed = time.monotonic()
        if self._refreshed - self._removed_read >= REMOVED_EVERY_S:
            self._removed = await removed_hosts(self._store)
            self._removed_read = self._refreshed
        up = set()
        for e in await self._store.range("hosts/"):
            name = str(e.value.get("name") or e.key.split("/", 1)[1])
            if name in self._removed:
                continue  # taken out of the cluster for good: the old machine's record is not believed
            url = str(e.value.get("agent_url", ""))
            self._records[name] = e.value
            if name not in self._clients or self._urls.get(name) != url:
                old = self._clients.get(name)
                if old is not None:
                    await old.close()
                self._clients[name] = AgentClient(
                    name, base_url=url, verify=self._tls if self._tls is not None else True
                )
                self._urls[name] = url
            up.add(name)
        self._up = up
        self._known = (self._known | up) - self._removed

    def names(self) -> list[str]:
        """Hosts that are up."""
        return sorted(self._up)

    def known(self) -> list[str]:
        """Every host seen since this control plane started, up or not."""
        return sorted(self._known)

    def forget(self, host: str) -> None:
        """``host`` was removed from the cluster (:func:`kasou.control.membership.mark_removed`): from now on."""
        self._removed.add(host)
        self._known.discard(host)
        self._up.discard(host)

    def welcome(self, host: str) -> None:
        """A host of a removed host's name joined again (its removal record cleared): its record counts again."""
        self._removed.discard(host)

    def is_up(self, host: str | None) -> bool:
        return host in self._up

    def record(self, host: str) -> dict[str, Any]:
        return self._records.get(host, {})

    def get(self, host: str | None) -> AgentClient:
        if host is None or host not in self._clients:
            raise AgentUnavailable(f"host {host!r} is not known to the control plane")
        if host not in self._up:
            raise AgentUnavailable(f"host {host} is down (its agent's lease has expired)")
        return self._clients[host]

    async def close(self) -> None:
        for c in self._clients.values():
            await c.close()


def flags_key(host: str) -> str:
    return f"hostflags/{host}"


async def maintenance_hosts(store: Store) -> set[str]:
    return {e.key.split("/", 1)[1] for e in await store.range("hostflags/") if e.value.get("maintenance")}
