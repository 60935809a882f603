"""The REST API's import and export routes, included in the token-guarded ``/v1`` router.

``POST /v1/imports`` defines a VM from disk files or an OVF/OVA in a host's transfer directory and
answers ``202`` with the VM, the job that converts its disks and the report of what was mapped how;
``POST /v1/vms/{name}/export`` writes a stopped VM as an OVA there, as a job
(:mod:`kasou.control.imports`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Body, Request
from pydantic import BaseModel, ConfigDict, Field

from kasou.api.windows import create_window
from kasou.config import vendor_max_priority
from kasou.control.records import JobRecord
from kasou.control.vms import VMView
from kasou.errors import Forbidden
from kasou.model.imports import ImportPlan, VMImport

if TYPE_CHECKING:
    from kasou.api.deps import Services


class ImportReport(ImportPlan):
    lines: list[str]  # the report as the CLI prints it (ImportPlan.report)


class ImportAccepted(BaseModel):
    vm: VMView
    job: JobRecord
    report: ImportReport


class ExportRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    ova: str = Field(min_length=1, max_length=1024)  # in the VM's host's transfer directory; must not exist


class ExportAccepted(BaseModel):
    job: JobRecord


def transfer_routes(svc: Callable[[], Services]) -> APIRouter:
    router = APIRouter()

    @router.post("/imports", status_code=202)
    async def import_vm(request: Request, body: dict[str, Any] = Body(...)) -> ImportAccepted:
        """Import a VM (disk files, an OVA or an OVF on a host); a department's vendor imports into theirs only."""
        spec = VMImport.parse(body)
        p = request.state.principal
        scope: tuple[str, ...] | None = None
        if p.scoped:
            await create_window(svc(), p, request)  # a vendor: inside an active window granting operate
            scope = tuple(p.departments)
            if spec.department is None and len(p.departments) == 1:
                spec = spec.model_copy(update={"department": p.departments[0]})
            if not p.sees(spec.department):
                mine = ", ".join(p.departments)
                raise Forbidden(f"user {p.name!r} may import VMs of their departments only ({mine}): give --department")
            if "priority" not in spec.model_fields_set:
                spec = spec.model_copy(update={"priority": min(spec.priority, vendor_max_priority())})
            ceiling = vendor_max_priority()
            if spec.priority > ceiling:
                raise Forbidden(f"user {p.name!r} ({p.role.value}) may set an HA priority up to {ceiling}, not "
                                f"{spec.priority}; an administrator sets a higher one")  # fmt: skip
        vm, job, plan = await svc().vms.imports.import_vm(spec, scope)
        return ImportAccepted(vm=vm, job=job, report=ImportReport(**plan.model_dump(), lines=plan.report()))

    @router.post("/vms/{name}/export", status_code=202)
    async def export_vm(name: str, body: ExportRequest) -> ExportAccepted:
        """Write a stopped VM as an OVA (streamOptimized vmdk disks, OVF descriptor, SHA256 manifest)."""
        return ExportAccepted(job=await svc().vms.imports.export_vm(name, body.ova))

    return router
