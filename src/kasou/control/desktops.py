"""Desktop pools in the control plane: records, assignment to signed-in users, reset, pre-start.

Records in the store:

* ``desktop-pools/<pool>``: the pool's spec (:class:`DesktopPoolCreate`) and its desktops;
* ``desktops/<vm>``: one desktop: its pool, and while it is in use its user, session and since when.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, Field

from kasou.model.desktops import ConsolePolicy, DesktopPoolCreate
from kasou.model.names import validate_name

if TYPE_CHECKING:
    from kasou.control.vms import VMService

POOLS_PREFIX = "desktop-pools/"
DESKTOPS_PREFIX = "desktops/"


class DesktopPoolRecord(BaseModel):
    spec: DesktopPoolCreate
    desktops: list[str] = []
    created_at: float = Field(default_factory=time.time)


DesktopState = Literal["free", "assigned", "resetting"]


class DesktopRecord(BaseModel):
    vm: str
    pool: str
    state: DesktopState = "free"
    user: str | None = None  # while assigned; in a persistent pool also after (its owner)
    session: str | None = None  # the session id (SHA-256 of the cookie token) it was handed to
    since: float | None = None
    clean: bool = True  # no session has used it since its last reset


class Desktops:
    """Desktop pools, attached as ``VMService.desktops``."""

    def __init__(self, vms: VMService) -> None:
        self.vms = vms
        self.store = vms.store

    async def _desktop(self, vm: str) -> DesktopRecord | None:
        e = await self.store.get(DESKTOPS_PREFIX + vm)
        return DesktopRecord.model_validate(e.value) if e is not None else None

    async def _pool(self, name: str) -> DesktopPoolRecord | None:
        e = await self.store.get(POOLS_PREFIX + name)
        return DesktopPoolRecord.model_validate(e.value) if e is not None else None

    async def user_may_open(self, user: str, vm: str) -> bool:
        """True only for the desktop assigned to ``user`` now (the console's check for a clinician)."""
        try:
            validate_name(vm)
        except Exception:
            return False
        d = await self._desktop(vm)
        return d is not None and d.state == "assigned" and d.user == user

    async def console_policy(self, vm: str) -> ConsolePolicy:
        """What the console of ``vm`` may carry besides the screen: its pool's allowances, else nothing."""
        try:
            validate_name(vm)
        except Exception:
            return ConsolePolicy()
        d = await self._desktop(vm)
        if d is None:
            return ConsolePolicy()
        pool = await self._pool(d.pool)
        return pool.spec.policy() if pool is not None else ConsolePolicy()
