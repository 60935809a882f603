"""The REST API's backup routes (``/v1/vms/{name}/backups...``), included in the token-guarded ``/v1`` router.

Create and restore are jobs (``202`` with the job); the list and the policy answer at once.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field

from kasou.control.backups import BackupView, PolicyUpdate, PolicyView
from kasou.control.records import JobRecord
from kasou.control.vms import VMView

if TYPE_CHECKING:
    from kasou.api.app import Services


class BackupRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    incremental: bool = False  # falls back to a full backup (and says so) when it cannot be incremental


class RestoreRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    as_: str = Field(alias="as")  # the new VM's name


class BackupJob(BaseModel):
    job: JobRecord


class RestoreAccepted(BaseModel):
    vm: VMView
    job: JobRecord


def backup_router(svc: Callable[[], Services]) -> APIRouter:
    r = APIRouter()

    @r.get("/vms/{name}/backups")
    async def list_backups(name: str) -> list[BackupView]:
        """The VM's backup generations, oldest first (also after the VM was deleted)."""
        return await svc().vms.backups.list(name)

    @r.post("/vms/{name}/backups", status_code=202)
    async def create_backup(name: str, body: BackupRequest | None = None) -> BackupJob:
        """Back the VM up now: ``{"incremental": true}`` copies only what changed since the latest generation."""
        req = body or BackupRequest()
        return BackupJob(job=await svc().vms.backups.create(name, incremental=req.incremental))

    @r.post("/vms/{name}/backups/{generation}/restore", status_code=202)
    async def restore_backup(name: str, generation: int, body: RestoreRequest) -> RestoreAccepted:
        """A new (stopped) VM ``{"as": NEWNAME}`` from the generation, refused if its files fail verification."""
        vm, job = await svc().vms.backups.restore(name, generation, body.as_)
        return RestoreAccepted(vm=vm, job=job)

    @r.get("/vms/{name}/backup-policy")
    async def get_backup_policy(name: str) -> PolicyView:
        return await svc().vms.backups.get_policy(name)

    @r.patch("/vms/{name}/backup-policy")
    async def set_backup_policy(name: str, body: PolicyUpdate) -> PolicyView:
        """The daily schedule (``daily``: HH:MM, or ``off``) and retention (``keep`` generations, at least 1)."""
        return await svc().vms.backups.set_policy(name, body)

    return r
