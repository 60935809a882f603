"""Directory sign-in: the hospital's LDAP / Active Directory settings, kept in the store, and the questions
the sign-in asks it (:mod:`kasou.control.users` signs directory users in and re-checks their sessions).

The settings live under ``directory/config`` (:class:`kasou.model.directory.DirectoryConfig`); the service
account's password is sealed with the site's secrets key (:mod:`kasou.control.sealed`) and never shown back.
Every LDAP call runs in a thread (:func:`asyncio.to_thread`) and is bounded twice: by ldap3's connect and
receive timeouts (``timeout_s`` each, per URL) and by a wait on the whole call here, so a directory that
stops answering never holds the API.

When the directory does not answer, an operator event ``directory_unreachable`` is raised once and cleared
when it answers again (``directory_reachable``); new directory sign-ins are refused ("the directory cannot
be reached: local accounts and break-glass still work"), and sessions of directory users continue until
their normal end (idle or maximum age) without re-checks, which resume once it answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any, TypeVar

from pydantic import BaseModel

from kasou.control.events import Events
from kasou.control.ldapclient import DirectoryServer, Entry, LdapDirectory, Settings
from kasou.control.sealed import Sealer
from kasou.errors import DirectoryUnavailable, InvalidSpec, NotFound, Unauthorized
from kasou.model.directory import (
    DirectoryConfig,
    DirectorySet,
    DirectoryTestResult,
    DirectoryView,
    Grant,
    Group,
    GroupMapping,
    group_key,
    resolve,
)
from kasou.store.base import Store

log = logging.getLogger(__name__)

CONFIG_KEY = "directory/config"
EVENT_KEY = "directory/unreachable"
SEALED_AS = "the directory service account's password"
UNREACHABLE = "the directory cannot be reached: local accounts and break-glass still work"
STATUS_EVERY_S = 30.0  # the public status is asked of the directory at most this often
DOWN_BACKOFF_S = 30.0  # after no answer, re-checks leave the directory alone this long
T = TypeVar("T")

Factory = Callable[[Settings], DirectoryServer]


class DirectoryUser(BaseModel):
    """What the directory says of a user: who they are, their groups, and what kasou gives them."""

    name: str
    dn: str
    display_name: str = ""
    disabled: bool = False
    groups: list[Group] = []
    grant: Grant


class Directory:
    """The directory settings and the questions asked of it. ``connect`` makes the LDAP client (a test
    double in the functional tests)."""

    connect: Factory = LdapDirectory

    def __init__(self, store: Store, sealer: Sealer) -> None:
        self.store = store
        self.sealer = sealer
        self.events = Events(store)
        self._status = "unknown"
        self._status_at = 0.0
        self._down_until = 0.0
        self._probe = asyncio.Lock()  # one status probe at a time (the status route is public)

    # -- the settings ------------------------------------------------------------------------

    async def config(self) -> DirectoryConfig | None:
        e = await self.store.get(CONFIG_KEY)
        return DirectoryConfig.model_validate(e.value) if e is not None else None

    async def enabled(self) -> bool:
        return await self.store.get(CONFIG_KEY) is not None

    async def view(self) -> DirectoryView:
        cfg = await self.config()
        if cfg is None:
            return DirectoryView(enabled=False, status="off")
        n = (cfg.ca_pem or "").count("-----BEGIN CERTIFICATE-----")
        return DirectoryView(enabled=True, urls=cfg.urls, base_dn=cfg.base_dn, bind_user=cfg.bind_user,
                             ca=f"given ({n} certificate{'s' if n != 1 else ''})" if n else "the system's",
                             user_filter=cfg.user_filter, starttls=cfg.starttls, timeout_s=cfg.timeout_s,
                             mappings=cfg.mappings,
                             status="" if self._status == "unknown" else self._status)  # fmt: skip

    async def set(self, spec: DirectorySet) -> DirectoryView:
        """Point kasou at a directory: the service account must bind (over verified TLS) first, else nothing
        changes. The group mappings already made are kept."""
        settings = Settings(tuple(spec.urls), spec.base_dn, spec.bind_user, spec.bind_password, spec.ca_pem,
                            spec.user_filter, spec.starttls, spec.timeout_s)  # fmt: skip
        await self._call(settings, lambda d: d.ping())
        old = await self.config()
        sealed = await asyncio.to_thread(self.sealer.seal, spec.bind_password, SEALED_AS)
        cfg = DirectoryConfig(urls=spec.urls, base_dn=spec.base_dn, bind_user=spec.bind_user, bind_password=sealed,
                              ca_pem=spec.ca_pem, user_filter=spec.user_filter, starttls=spec.starttls,
                              timeout_s=spec.timeout_s, mappings=old.mappings if old else {})  # fmt: skip
        await self.store.put(CONFIG_KEY, cfg.model_dump(mode="json"))
        await self._answered(True, "")
        return await self.view()

    async def off(self) -> bool:
        """Stop directory sign-in (directory users' records stay, and can no longer sign in). True if it was on."""
        was = await self.store.delete(CONFIG_KEY)
        await self.events.clear(EVENT_KEY)
        self._status = "unknown"
        return bool(was)

    async def _must(self) -> DirectoryConfig:
        cfg = await self.config()
        if cfg is None:
            raise NotFound("no directory is set: kasou directory set --url ldaps://... first")
        return cfg

    async def map(self, group: str, mapping: GroupMapping) -> DirectoryView:
        key = group_key(group)
        cfg = await self._must()
        cfg.mappings[key] = mapping
        await self.store.put(CONFIG_KEY, cfg.model_dump(mode="json"))
        return await self.view()

    async def unmap(self, group: str) -> DirectoryView:
        key = group_key(group)
        cfg = await self._must()
        if cfg.mappings.pop(key, None) is None:
            raise NotFound(f"the group {group!r} is not mapped")
        await self.store.put(CONFIG_KEY, cfg.model_dump(mode="json"))
        return await self.view()

    # -- asking the directory ------------------------------------------------------------------

    def _settings(self, cfg: DirectoryConfig) -> Settings:
        pw = self.sealer.open(cfg.bind_password, SEALED_AS)
        return Settings(tuple(cfg.urls), cfg.base_dn, cfg.bind_user, pw, cfg.ca_pem, cfg.user_filter, cfg.starttls,
                        cfg.timeout_s)  # fmt: skip

    async def _call(self, settings: Settings, fn: Callable[[DirectoryServer], T]) -> T:
        """``fn`` on a client of ``settings``, in a thread, waited for at most the time each URL may take."""
        budget = settings.timeout_s * 3 * len(settings.urls) + 5  # connect, StartTLS/bind, answers

        def run() -> T:
            client = type(self).connect(settings)
            try:
                return fn(client)
            finally:
                client.close()

        try:
            return await asyncio.wait_for(asyncio.to_thread(run), budget)
        except TimeoutError:
            raise DirectoryUnavailable(f"the directory did not answer within {budget:.0f} s") from None

    async def _ask(self, cfg: DirectoryConfig, fn: Callable[[DirectoryServer], T]) -> T:
        settings = await asyncio.to_thread(self._settings, cfg)
        try:
            out = await self._call(settings, fn)
        except DirectoryUnavailable as e:
            await self._answered(False, e.message)
            raise
        await self._answered(True, "")
        return out

    async def _answered(self, ok: bool, why: str) -> None:
        """Note whether the directory answered: the operator event is raised once and cleared once."""
        now = time.monotonic()
        self._status, self._status_at = ("ok" if ok else "unreachable"), now
        if ok:
            self._down_until = 0.0
            await self.events.clear(EVENT_KEY, "directory_reachable", "the directory answers again")
        else:
            self._down_until = now + DOWN_BACKOFF_S
            log.warning("directory unreachable: %s", why)
            await self.events.raise_once(EVENT_KEY, "directory_unreachable", "directory",
                                         f"{why}: directory users cannot sign in (sessions continue); local "
                                         "accounts and break-glass still work", severity="error")  # fmt: skip

    def resting(self) -> bool:
        """True while the directory did not answer lately (re-checks leave it alone)."""
        return time.monotonic() < self._down_until

    async def status(self) -> str:
        """``off``, ``ok`` or ``unreachable``; asked of the directory at most every STATUS_EVERY_S."""
        cfg = await self.config()
        if cfg is None:
            return "off"
        async with self._probe:
            if self._status == "unknown" or time.monotonic() - self._status_at > STATUS_EVERY_S:
                with contextlib.suppress(DirectoryUnavailable):
                    await self._ask(cfg, lambda d: d.ping())
        return self._status

    @staticmethod
    def _user(cfg: DirectoryConfig, name: str, entry: Entry, groups: list[Group]) -> DirectoryUser:
        return DirectoryUser(name=name, dn=entry.dn, display_name=entry.display_name, disabled=entry.disabled,
                             groups=groups, grant=resolve(groups, cfg.mappings))  # fmt: skip

    async def authenticate(self, name: str, password: str) -> DirectoryUser | None:
        """Sign-in: the user ``name`` with ``password``, their groups and grant; None if the directory knows no
        such user. Unauthorized for a wrong password, AccountRefused for a disabled/expired/locked account,
        DirectoryUnavailable (with UNREACHABLE) when it does not answer."""
        cfg = await self._must()

        def ask(d: DirectoryServer) -> tuple[Entry, list[Group]] | None:
            entry = d.find_user(name)
            if entry is None:
                return None
            d.check_password(entry.dn, password)
            return entry, d.groups(entry.dn)

        try:
            found = await self._ask(cfg, ask)
        except DirectoryUnavailable:
            raise DirectoryUnavailable(UNREACHABLE) from None
        if found is None:
            return None
        return self._user(cfg, name, *found)

    async def lookup(self, name: str) -> DirectoryUser | None:
        """A re-check (no password): the user as the directory has them now; None if it no longer has them."""
        cfg = await self._must()

        def ask(d: DirectoryServer) -> tuple[Entry, list[Group]] | None:
            entry = d.find_user(name)
            return None if entry is None else (entry, d.groups(entry.dn))

        found = await self._ask(cfg, ask)
        return None if found is None else self._user(cfg, name, *found)

    async def test(self, name: str, password: str | None) -> DirectoryTestResult:
        """``kasou directory test``: what the directory says of ``name`` and what kasou would give them."""
        cfg = await self._must()
        t0 = time.perf_counter()
        out: dict[str, Any] = {"user": name, "found": False}

        def ask(d: DirectoryServer) -> None:
            entry = d.find_user(name)
            out["url"] = d.answered
            if entry is None:
                return
            groups = d.groups(entry.dn)
            u = self._user(cfg, name, entry, groups)
            out.update(found=True, dn=u.dn, display_name=u.display_name, disabled=u.disabled, groups=u.groups,
                       grant=u.grant)  # fmt: skip
            if password is not None:
                try:
                    d.check_password(entry.dn, password)
                    out["bind"] = "ok"
                except Unauthorized as e:
                    out["bind"] = e.message

        if not name or len(name) > 256:
            raise InvalidSpec("give the user's sign-in name", field="user")
        await self._ask(cfg, ask)
        out["elapsed_ms"] = round((time.perf_counter() - t0) * 1000, 1)
        return DirectoryTestResult.model_validate(out)
