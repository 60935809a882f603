"""The kasou REST API (``/v1``). Every route needs the API token.

Long operations answer ``202`` with a job; ``GET /v1/jobs/{id}`` follows it.
Errors are kasou's JSON shape, mapped to HTTP in :mod:`kasou.wire`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Body, Depends, FastAPI, Query, Request
from fastapi.responses import JSONResponse, PlainTextResponse
from pydantic import BaseModel

from kasou import __version__
from kasou.agent.hostinfo import HostInfo
from kasou.api.auth import check_bearer
from kasou.control.jobs import Jobs
from kasou.control.ledger import Ledger
from kasou.control.records import JobRecord, LedgerEntry
from kasou.control.vms import Agents, VMService, VMView
from kasou.errors import AgentUnavailable, OperationTimeout
from kasou.model.spec import VMCreate, validate_name
from kasou.model.state import Action
from kasou.store.base import Store
from kasou.wire import install_error_handlers


@dataclass
class Services:
    store: Store
    agents: Agents
    jobs: Jobs
    ledger: Ledger
    vms: VMService

    @classmethod
    def build(cls, store: Store, agents: Agents, shutdown_timeout: float = 60.0) -> Services:
        jobs = Jobs(store)
        ledger = Ledger(store)
        return cls(store, agents, jobs, ledger, VMService(store, agents, jobs, ledger, shutdown_timeout))

    async def close(self) -> None:
        await self.vms.close()
        await self.agents.close()
        await self.store.close()


class CreateAccepted(BaseModel):
    vm: VMView
    job: JobRecord


class JobAccepted(BaseModel):
    job: JobRecord


PowerAction = Action  # the path parameter; delete and template have their own routes


def create_app(services_factory: Callable[[], Awaitable[Services]], token: str) -> FastAPI:
    state: dict[str, Services] = {}

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        svc = await services_factory()
        await svc.vms.startup()
        state["svc"] = svc
        try:
            yield
        finally:
            await svc.close()

    app = FastAPI(
        title="kasou",
        version=__version__,
        description="Server and desktop virtualization for hospital information systems.",
        lifespan=lifespan,
    )
    install_error_handlers(app)

    async def authorized(request: Request) -> None:
        check_bearer(request.headers.get("authorization"), token)

    def svc() -> Services:
        return state["svc"]

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(authorized)])

    @v1.get("/version")
    async def version() -> dict[str, str]:
        return {"version": __version__}

    @v1.get("/hosts")
    async def hosts() -> list[HostInfo]:
        out = []
        for name in svc().agents.names():
            try:
                out.append(await svc().agents.get(name).host_info())
            except (AgentUnavailable, OperationTimeout):
                continue
        return out

    @v1.get("/vms")
    async def list_vms() -> list[VMView]:
        return await svc().vms.list_all()

    @v1.post("/vms", status_code=202)
    async def create_vm(body: dict[str, Any] = Body(...)) -> CreateAccepted:
        spec = VMCreate.parse(body)
        vm, job = await svc().vms.create(spec)
        return CreateAccepted(vm=vm, job=job)

    @v1.get("/vms/{name}")
    async def get_vm(name: str) -> VMView:
        return await svc().vms.get(name)

    @v1.delete("/vms/{name}", status_code=202)
    async def delete_vm(name: str, keep_disks: bool = False, force: bool = False) -> JobAccepted:
        return JobAccepted(job=await svc().vms.delete(name, keep_disks=keep_disks, force=force))

    @v1.post("/vms/{name}/actions/{action}", status_code=202)
    async def vm_action(
        name: str, action: PowerAction, timeout: float | None = Query(None, gt=0, le=3600)
    ) -> JobAccepted:
        return JobAccepted(job=await svc().vms.action(name, action, timeout))

    @v1.post("/vms/{name}/template")
    async def make_template(name: str) -> VMView:
        return await svc().vms.make_template(name)

    @v1.get("/vms/{name}/console", response_class=PlainTextResponse)
    async def console(name: str, max_bytes: int = Query(65536, ge=1, le=16 * 1024 * 1024)) -> str:
        return await svc().vms.console_log(name, max_bytes)

    @v1.get("/vms/{name}/history")
    async def history(name: str) -> list[LedgerEntry]:
        return await svc().vms.history(name)

    @v1.get("/jobs")
    async def list_jobs(vm: str | None = None, limit: int = Query(50, ge=1, le=1000)) -> list[JobRecord]:
        if vm is not None:
            validate_name(vm)
        return await svc().jobs.list(vm, limit)

    @v1.get("/jobs/{job_id}")
    async def get_job(job_id: str) -> JobRecord:
        return await svc().jobs.get(job_id)

    app.include_router(v1)

    @app.get("/", include_in_schema=False)
    async def root() -> JSONResponse:
        return JSONResponse({"name": "kasou", "version": __version__, "api": "/v1", "docs": "/docs"})

    return app
