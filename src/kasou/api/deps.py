"""The services every route of the API works with (:class:`Services`: the store, the agents, the control
plane's services), built once per process. :mod:`kasou.api.app` and its route modules take them from
here, so no route module imports the app that mounts it."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from kasou.config import HaTimes, TlsFiles, ha_times, vcpu_ratio_setting
from kasou.control.balance import Balancer
from kasou.control.certwatch import CertWatch
from kasou.control.hosts import Agents
from kasou.control.jobs import Jobs
from kasou.control.leader import Leadership
from kasou.control.ledger import Ledger
from kasou.control.maintenance import MaintenanceWindows
from kasou.control.membership import Membership
from kasou.control.migration import Migrations
from kasou.control.networks import Networks
from kasou.control.notify import Notifier, NotifyConfig, notify_config
from kasou.control.revocation import Revocations
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
    balancer: Balancer = field(default=None)  # type: ignore[assignment]  # kasou cluster balance, its automatic mode
    logout_hooks: list[Callable[[str, str], Awaitable[None]]] = field(default_factory=list)  # (user, session)
    notifier: Notifier = field(default=None)  # type: ignore[assignment]  # set by build: events to mail, webhooks, syslog
    certs: CertWatch = field(default=None)  # type: ignore[assignment]  # set by build: certificates that will expire
    revocations: Revocations | None = None  # a cluster's: the revocation list signed (the CA's host) and written
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
        tls: TlsFiles | None = None,
        notify: NotifyConfig | None = None,
    ) -> Services:
        """``tls``: this host's TLS files, whose certificates are watched; ``notify``: the notification
        settings (default: :func:`kasou.control.notify.notify_config`)."""
        jobs = Jobs(store)
        ledger = Ledger(store)
        vms = VMService(
            store, agents, jobs, ledger, shutdown_timeout, vcpu_ratio or vcpu_ratio_setting(), ha or ha_times()
        )
        svc = cls(store, agents, jobs, ledger, vms, Migrations(vms), users=Users(store),
                  windows=MaintenanceWindows(store))  # fmt: skip
        svc.balancer = Balancer(svc.migrations)
        vms.periodic.append(svc.balancer.tick)  # recommend and automatic mode: the leader's reconciler
        svc.logout_hooks.append(vms.desktops.on_logout)  # a sign-out returns the session's desktops
        svc.notifier = Notifier(store, notify or notify_config())
        svc.certs = CertWatch(store, tls)
        return svc

    async def start(self) -> None:
        # every API server tells of the events it records, and watches its own host's certificates
        await self.notifier.start()
        if self.certs.files is not None:
            self.certs.start()
        if self.revocations is not None:
            self.revocations.start()
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
        await self.certs.close()
        if self.revocations is not None:
            await self.revocations.close()
        await self.notifier.close()
        if self.leadership is not None:
            await self.leadership.resign()
        await self.agents.close()
        await self.store.close()
