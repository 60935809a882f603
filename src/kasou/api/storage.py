"""``/v1/pools`` and ``/v1/vms/{name}/disks``: storage pools and mirrored disks."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Body
from pydantic import BaseModel, ConfigDict

from kasou.control.pools import PoolView
from kasou.control.records import JobRecord
from kasou.model.pools import PoolCreate
from kasou.model.spec import validate_name

if TYPE_CHECKING:
    from kasou.api.deps import Services


class RebuildRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    pool: str  # where the new second copy goes


class RebuildAccepted(BaseModel):
    job: JobRecord


def storage_routes(svc: Callable[[], Services]) -> APIRouter:
    r = APIRouter()

    @r.get("/pools")
    async def list_pools() -> list[PoolView]:
        """Every pool with its capacity, allocation, provisioned sizes and over-commit, per host (shared: once)."""
        return await svc().vms.pools.list_all()

    @r.post("/pools", status_code=201)
    async def create_pool(body: dict[str, Any] = Body(...)) -> PoolView:
        return await svc().vms.pools.create(PoolCreate.parse(body))

    @r.get("/pools/{pool}")
    async def get_pool(pool: str) -> PoolView:
        validate_name(pool, "pool")
        return await svc().vms.pools.get(pool)

    @r.delete("/pools/{pool}", status_code=204)
    async def delete_pool(pool: str) -> None:
        """Refused (409) while a disk is in it; its directory and files stay."""
        validate_name(pool, "pool")
        await svc().vms.pools.delete(pool)

    @r.post("/vms/{name}/disks/{disk_id}/rebuild", status_code=202)
    async def rebuild_disk(name: str, disk_id: str, body: RebuildRequest) -> RebuildAccepted:
        """Give a mirrored disk a new second copy in a pool (online while the VM runs)."""
        return RebuildAccepted(job=await svc().vms.mirrors.rebuild(name, disk_id, body.pool))

    return r
