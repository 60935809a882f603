"""The REST API's backup routes (``/v1/vms/{name}/backups...``), included in the token-guarded ``/v1`` router.

Create and restore are jobs (``202`` with the job); the list and the policy answer at once.

Generations belong to the VM that was backed up (its uuid and department): the list and restore
of a name reach the generations of the VM that holds the name now; an earlier, deleted VM's are
reached with its ``uuid`` by users not confined to departments (administrators, operators,
auditors). A vendor reaches only generations of their departments (:mod:`kasou.control.backups`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Query, Request, Response
from pydantic import BaseModel, ConfigDict, Field

from kasou.control.backup_policy import PolicyUpdate, PolicyView
from kasou.control.backup_records import BackupView
from kasou.control.backup_status import BackupStatus, status
from kasou.control.drill import DrillRequest, DrillResult
from kasou.control.offsite import OffsiteSet, OffsiteView, RestorePlanItem, RestorePlanRequest
from kasou.control.records import JobRecord
from kasou.control.vms import VMView
from kasou.errors import Forbidden, InvalidSpec

if TYPE_CHECKING:
    from kasou.api.deps import Services


class PolicyList(BaseModel):
    departments: list[PolicyView]
    vms: list[PolicyView]


class BackupRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    incremental: bool = False  # falls back to a full backup (and says so) when it cannot be incremental


class RestoreRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    as_: str = Field(alias="as")  # the new VM's name
    uuid: str | None = None  # a generation of the (deleted) VM with this uuid, not of the one holding the name now
    # from the backup server's generation (docs/backup-server.md), opened with ``key``: the backup key's private
    # part (its JSON), which the operator gives for this restore; it is used in memory and never kept
    from_server: bool = False
    key: dict[str, Any] | None = None
    host: str | None = None  # where the restored VM goes (from the server only; default: the scheduler's choice)


class FileRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    path: str  # absolute, in the guest
    key: dict[str, Any]  # the backup key's private part, for this request only
    disk: str | None = None  # default: the first disk


class IsolateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    rejoin: bool = False


class BackupJob(BaseModel):
    job: JobRecord


class RestoreAccepted(BaseModel):
    vm: VMView
    job: JobRecord


def _scope(request: Request, uuid: str | None) -> tuple[str, ...] | None:
    """The departments the principal is confined to (None: not confined); a confined one gives no ``uuid``."""
    p = request.state.principal
    if not p.scoped:
        return None
    if uuid is not None:
        raise Forbidden(f"user {p.name!r} ({p.role.value}) reaches the backups of the VM that holds the name only")
    return tuple(p.departments)


def backup_router(svc: Callable[[], Services]) -> APIRouter:
    r = APIRouter()

    @r.get("/vms/{name}/backups")
    async def list_backups(
        request: Request, name: str, uuid: str | None = Query(None), server: bool = Query(False)
    ) -> list[BackupView]:
        """The VM's backup generations, oldest first (also after the VM was deleted); ``uuid``: those of
        an earlier VM of that name; ``server``: with the backup server's lock, verification and second sites."""
        return await svc().vms.backups.list(name, uuid, _scope(request, uuid), server=server)

    @r.post("/vms/{name}/backups", status_code=202)
    async def create_backup(name: str, body: BackupRequest | None = None) -> BackupJob:
        """Back the VM up now: ``{"incremental": true}`` copies only what changed since the latest generation."""
        req = body or BackupRequest()
        return BackupJob(job=await svc().vms.backups.create(name, incremental=req.incremental))

    @r.post("/vms/{name}/backups/{generation}/restore", status_code=202)
    async def restore_backup(request: Request, name: str, generation: int, body: RestoreRequest) -> RestoreAccepted:
        """A new (stopped) VM ``{"as": NEWNAME}`` from the generation, refused if its files fail verification."""
        scope = _scope(request, body.uuid)
        backups = svc().vms.backups
        if body.from_server:
            if body.key is None:
                raise InvalidSpec("a restore from the backup server needs the backup key (--key FILE)", field="key")
            if scope is not None:
                raise Forbidden(f"user {request.state.principal.name!r} cannot restore from the backup server")
            vm, job = await backups.offsite.restore(name, generation, body.as_, body.key, body.host)
        else:
            if body.key is not None or body.host is not None:
                raise InvalidSpec("key and host are for a restore from the backup server (from_server)", field="key")
            vm, job = await backups.restore(name, generation, body.as_, body.uuid, scope)
        return RestoreAccepted(vm=vm, job=job)

    @r.post("/vms/{name}/backups/{generation}/file", response_class=Response)
    async def backup_file(name: str, generation: int, body: FileRequest) -> Response:
        """One file of a backup server's generation (its first disk, or ``disk``), read-only, as bytes."""
        data = await svc().vms.backups.offsite.read_file(name, generation, body.path, body.key, body.disk)
        return Response(content=data, media_type="application/octet-stream")

    @r.get("/vms/{name}/backups/server")
    async def list_server_backups(name: str) -> list[dict[str, Any]]:
        """The generations of the name the backup server holds, with their locks and verification."""
        return await svc().vms.backups.offsite.generations(name)

    @r.get("/backups/status")
    async def backup_status() -> list[BackupStatus]:
        """Per VM: its newest generation, its age against its schedule, its copy on the backup server."""
        return await status(svc().vms.backups)

    @r.get("/backup-server")
    async def get_backup_server() -> OffsiteView | None:
        """The site's backup server, or null (the token and key are never shown)."""
        return await svc().vms.backups.offsite.get()

    @r.put("/backup-server")
    async def set_backup_server(body: OffsiteSet) -> OffsiteView:
        """Copy every new generation to this backup server, encrypted to this public key (checked first)."""
        return await svc().vms.backups.offsite.set(body)

    @r.post("/backup-server/restore-plan")
    async def restore_plan(body: RestorePlanRequest) -> list[RestorePlanItem]:
        """What bringing every VM back from the backup server restores, in order (opened with the given key)."""
        return await svc().vms.backups.offsite.plan(body.key, body.before, body.vms)

    @r.post("/backup-server/drill", status_code=202)
    async def start_drill(body: DrillRequest) -> BackupJob:
        """A restore drill (a job): each VM's newest generation restored onto an isolated network, booted, checked
        (optionally by a command run in the guest), and removed; each VM's latest drill is kept."""
        return BackupJob(job=await svc().vms.backups.drills.start(body))

    @r.get("/backup-server/drills")
    async def list_drills() -> list[DrillResult]:
        """Each VM's latest restore drill."""
        return await svc().vms.backups.drills.last()

    @r.post("/backup-server/isolate")
    async def isolate_backup_server(body: IsolateRequest) -> OffsiteView:
        """Cut every host off from the backup server (``{"rejoin": true}``: undo)."""
        return await svc().vms.backups.offsite.isolate(not body.rejoin)

    @r.delete("/backup-server")
    async def remove_backup_server() -> dict[str, bool]:
        return {"removed": await svc().vms.backups.offsite.clear()}

    @r.get("/vms/{name}/backup-policy")
    async def get_backup_policy(name: str) -> PolicyView:
        return await svc().vms.backups.get_policy(name)

    @r.patch("/vms/{name}/backup-policy")
    async def set_backup_policy(name: str, body: PolicyUpdate) -> PolicyView:
        """The VM's own schedule (``daily`` HH:MM or ``off``, ``weekly`` full day), retention (``keep``,
        ``keep_daily``, ``keep_weekly``, ``keep_monthly``) and ``lock_days`` asked of the backup server."""
        return await svc().vms.backups.set_policy(name, body)

    @r.get("/backup-policies")
    async def list_backup_policies() -> PolicyList:
        """Every department's own settings and every VM's effective policy (with where each part comes from)."""
        b = svc().vms.backups
        depts = [await b.policies.get_department(d) for d in await b.policies.departments()]
        return PolicyList(departments=depts, vms=[await b.get_policy(v.name) for v in await svc().vms.records.all()])

    @r.get("/departments/{department}/backup-policy")
    async def get_department_backup_policy(department: str) -> PolicyView:
        return await svc().vms.backups.policies.get_department(department)

    @r.patch("/departments/{department}/backup-policy")
    async def set_department_backup_policy(department: str, body: PolicyUpdate) -> PolicyView:
        """A department's schedule, retention and lock: its VMs follow them where their own settings say nothing."""
        return await svc().vms.backups.policies.set_department(department, body)

    return r
