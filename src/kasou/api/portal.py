"""The desktop portal for clinicians (``/v1/portal``, permission "portal") and the operators' desktop
pools (``/v1/desktop-pools``, through the default /v1 router: read to list, operate to change)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Body, Depends, Request
from pydantic import BaseModel

from kasou.api.auth import Principal
from kasou.control.desktop_records import DesktopPoolView, DesktopView, PortalPool
from kasou.control.records import JobRecord
from kasou.model.desktops import (
    DesktopPoolCreate,
    DesktopPoolResize,
    DesktopRequest,
    ReleaseRequest,
    validate_pool_name,
)

if TYPE_CHECKING:
    from kasou.api.deps import Services


class PoolAccepted(BaseModel):
    pool: DesktopPoolView
    job: JobRecord | None


class PoolJob(BaseModel):
    job: JobRecord


class Released(BaseModel):
    released: list[str]


def portal_routes(svc: Callable[[], Services], principal: Callable[[Request], Awaitable[Principal]]) -> APIRouter:
    """``/v1/portal``: a signed-in user's desktops of the pools they are entitled to."""
    r = APIRouter(prefix="/v1/portal")

    async def who(request: Request) -> Principal:
        p = await principal(request)
        p.require("portal")
        return p

    @r.get("/pools")
    async def pools(p: Principal = Depends(who)) -> list[PortalPool]:
        """The desktop pools the user is entitled to, with their own desktop there if they have one."""
        return await svc().vms.desktops.portal_pools(p.name, p.pools)

    @r.post("/desktop")
    async def get_desktop(p: Principal = Depends(who), body: dict[str, Any] = Body(...)) -> DesktopView:
        """The user's desktop of a pool: the same one while the session lasts, else a free one (409 if none)."""
        req = DesktopRequest.parse(body)
        return await svc().vms.desktops.acquire(p.name, p.session, p.pools, req.pool)

    @r.get("/desktop")
    async def my_desktops(p: Principal = Depends(who)) -> list[DesktopView]:
        """The desktops assigned to the user now."""
        return await svc().vms.desktops.my_desktops(p.name)

    @r.post("/desktop/release")
    async def release(p: Principal = Depends(who), body: ReleaseRequest | None = Body(None)) -> Released:
        """Give the user's desktops back (of one pool if given); non-persistent ones are reset."""
        pool = body.pool if body is not None else None
        if pool is not None:
            validate_pool_name(pool)
        return Released(released=await svc().vms.desktops.release(p.name, None, pool))

    return r


def desktop_pool_routes(svc: Callable[[], Services]) -> APIRouter:
    """``/v1/desktop-pools`` for operators (included in the /v1 router: read, operate)."""
    r = APIRouter()

    @r.get("/desktop-pools")
    async def list_pools() -> list[DesktopPoolView]:
        return await svc().vms.desktops.list_pools()

    @r.post("/desktop-pools", status_code=202)
    async def create_pool(body: dict[str, Any] = Body(...)) -> PoolAccepted:
        """Make N desktops as linked clones of a template (a job); K of them are then kept booted."""
        view, job = await svc().vms.desktops.create_pool(DesktopPoolCreate.parse(body))
        return PoolAccepted(pool=view, job=job)

    @r.get("/desktop-pools/{pool}")
    async def get_pool(pool: str) -> DesktopPoolView:
        return await svc().vms.desktops.get_pool(pool)

    @r.patch("/desktop-pools/{pool}", status_code=202)
    async def resize_pool(pool: str, body: dict[str, Any] = Body(...)) -> PoolAccepted:
        """Change the size (desktops made or free ones deleted) or the number kept pre-started."""
        view, job = await svc().vms.desktops.resize(pool, DesktopPoolResize.parse(body))
        return PoolAccepted(pool=view, job=job)

    @r.delete("/desktop-pools/{pool}", status_code=202)
    async def delete_pool(pool: str, force: bool = False) -> PoolJob:
        """Delete the pool and its desktops; refused (409) while desktops are in use unless force."""
        return PoolJob(job=await svc().vms.desktops.delete_pool(pool, force))

    return r
