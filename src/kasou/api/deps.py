"""The services every route of the API works with (:class:`Services`: the store, the agents, the control
plane's services), built once per process. :mod:`kasou.api.app` and its route modules take them from
here, so no route module imports the app that mounts it."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from kasou.config import HaTimes, ha_times, vcpu_ratio_setting
from kasou.control.hosts import Agents
from kasou.control.jobs import Jobs
from kasou.control.leader import Leadership
from kasou.control.ledger import Ledger
from kasou.control.maintenance import MaintenanceWindows
from kasou.control.membership import Membership
from kasou.control.migration import Migrations
from kasou.control.networks import Networks
from kasou.control.users import Users
from kasou.control.vms import VMService
from kasou.store.base import Store


@dataclass
class Services:
    store: Store
    agents: Agents
    jobs: Jobs
    ledger: Ledger
    vms: VMService
    migrations: Migrations
    leadership: Leadership | None = None  # None: a single host, always in charge
    membership: Membership | None = None  # a cluster's etcd members (kasou cluster join, leave); None: one host
    users: Users = field(default=None)  # type: ignore[assignment]  # set by build
    windows: MaintenanceWindows = field(default=None)  # type: ignore[assignment]  # vendors' maintenance windows
    logout_hooks: list[Callable[[str, str], Awaitable[None]]] = field(default_factory=list)  # (user, session)
    _election: asyncio.Task[None] | None = None

    @property
    def networks(self) -> Networks:
        return self.vms.networks

    @classmethod
    def build(
        cls,
        store: Store,
        agents: Agents,
        shutdown_timeout: float = 60.0,
        vcpu_ratio: float | None = None,
        ha: HaTimes | None = None,
    ) -> Services:
        jobs = Jobs(store)
        ledger = Ledger(store)
        vms = VMService(
            store, agents, jobs, ledger, shutdown_timeout, vcpu_ratio or vcpu_ratio_setting(), ha or ha_times()
        )
        svc = cls(store, agents, jobs, ledger, vms, Migrations(vms), users=Users(store),
                  windows=MaintenanceWindows(store))  # fmt: skip
        svc.logout_hooks.append(vms.desktops.on_logout)  # a sign-out returns the session's desktops
        return svc

    async def start(self) -> None:
        if self.leadership is None:
            await self.vms.startup()
        else:
            self._election = asyncio.create_task(self.leadership.run(), name="leader-election")

    async def close(self) -> None:
        if self._election is not None:
            self._election.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._election
        await self.vms.close()
        if self.leadership is not None:
            await self.leadership.resign()
        await self.agents.close()
        await self.store.close()
