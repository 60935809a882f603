"""The REST API's snapshot routes (``/v1/vms/{name}/snapshots...``), included in the token-guarded ``/v1`` router.

Create, revert and delete are jobs (``202`` with the job); list and show answer at once.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Body
from pydantic import BaseModel

from kasou.control.records import JobRecord
from kasou.control.snapshots import SnapshotView
from kasou.model.snapshots import SnapshotCreate

if TYPE_CHECKING:
    from kasou.api.deps import Services


class SnapshotJob(BaseModel):
    job: JobRecord


def snapshot_router(svc: Callable[[], Services]) -> APIRouter:
    r = APIRouter()

    @r.get("/vms/{name}/snapshots")
    async def list_snapshots(name: str) -> list[SnapshotView]:
        """The VM's snapshots, oldest first (the newest is the one a revert goes to)."""
        return await svc().vms.snapshots.list(name)

    @r.post("/vms/{name}/snapshots", status_code=202)
    async def create_snapshot(name: str, body: dict[str, Any] = Body(...)) -> SnapshotJob:
        """Take a snapshot: ``{"name": ..., "memory": false}``; ``memory`` needs a running guest."""
        return SnapshotJob(job=await svc().vms.snapshots.create(name, SnapshotCreate.parse(body)))

    @r.get("/vms/{name}/snapshots/{snapshot}")
    async def get_snapshot(name: str, snapshot: str) -> SnapshotView:
        return await svc().vms.snapshots.get(name, snapshot)

    @r.post("/vms/{name}/snapshots/{snapshot}/revert", status_code=202)
    async def revert_snapshot(name: str, snapshot: str) -> SnapshotJob:
        """Go back to the newest snapshot: with memory the guest runs on from that instant."""
        return SnapshotJob(job=await svc().vms.snapshots.revert(name, snapshot))

    @r.delete("/vms/{name}/snapshots/{snapshot}", status_code=202)
    async def delete_snapshot(name: str, snapshot: str) -> SnapshotJob:
        """Merge the snapshot away (while the VM runs); its disk chain gets one layer shorter."""
        return SnapshotJob(job=await svc().vms.snapshots.delete(name, snapshot))

    return r
