"""``/v1/cluster/balance``: the load balancer's plan and run, and its settings (:mod:`kasou.control.balance`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from fastapi import APIRouter

from kasou.control.balance import BalanceRequest, BalanceResult, BalanceSettings

if TYPE_CHECKING:
    from kasou.api.deps import Services


def balance_routes(svc: Callable[[], Services]) -> APIRouter:
    r = APIRouter()

    @r.post("/cluster/balance", status_code=202)
    async def balance(body: BalanceRequest | None = None) -> BalanceResult:
        """The moves that even out the hosts' CPU and memory pressure, each with its reason; unless ``dry_run``
        they run as one job of live migrations (``job``; none when there is nothing to move)."""
        return await svc().balancer.balance(dry_run=(body or BalanceRequest()).dry_run)

    @r.get("/cluster/balance/settings")
    async def get_settings() -> BalanceSettings:
        return await svc().balancer.settings()

    @r.put("/cluster/balance/settings")
    async def put_settings(body: BalanceSettings) -> BalanceSettings:
        """Mode (off, recommend, automatic), threshold and hysteresis in points of pressure spread, moves per
        round, migrations at once, a moved VM's cool-down, the interval of automatic rounds, local disks."""
        return await svc().balancer.set_settings(body)

    return r
