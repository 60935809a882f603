"""The kasou REST API (``/v1``). Every route needs the permission stated in :mod:`kasou.api.permissions`.

Long operations answer ``202`` with a job; ``GET /v1/jobs/{id}`` follows it.
Errors are kasou's JSON shape, mapped to HTTP in :mod:`kasou.wire`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import asynccontextmanager
from typing import Any, cast

import httpx
from fastapi import APIRouter, Body, Depends, FastAPI, Query, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from pydantic import BaseModel, ConfigDict
from starlette.requests import HTTPConnection

from kasou import __version__
from kasou.api import permissions
from kasou.api.audit import audit_middleware, audit_routes, mark_forwarded, sign_forwarded
from kasou.api.auth import CSRF_HEADER, SESSION_COOKIE, Principal, resolve_principal
from kasou.api.backups import backup_router
from kasou.api.balance import balance_routes
from kasou.api.bulk import bulk_routes, keep
from kasou.api.cluster import NOT_FORWARDED, cluster_routes
from kasou.api.console import console_routes
from kasou.api.deps import Services
from kasou.api.devices import device_routes
from kasou.api.directory import directory_routes
from kasou.api.document import document_api
from kasou.api.limits import BodyLimit
from kasou.api.live import live_routes
from kasou.api.media import media_router
from kasou.api.metrics import metrics_routes
from kasou.api.notify import notify_routes
from kasou.api.portal import desktop_pool_routes, portal_routes
from kasou.api.recordings import recording_routes
from kasou.api.snapshots import snapshot_router
from kasou.api.storage import storage_routes
from kasou.api.transfers import transfer_routes
from kasou.api.users import user_routes
from kasou.api.watches import DEFAULT_TIMEOUT_S, vm_filter, watch_routes
from kasou.api.windows import create_window, vendor_reach, window_for, window_routes
from kasou.config import vendor_max_priority
from kasou.control import revocation
from kasou.control.events import Event, Severity
from kasou.control.hosts import HostView
from kasou.control.membership import members_of
from kasou.control.networks import NetworkView
from kasou.control.records import JobRecord, LedgerEntry
from kasou.control.report import UptimeRow, uptime_row
from kasou.control.vms import VMView
from kasou.errors import AgentUnavailable, Forbidden, NotFound
from kasou.model.cluster import Member, RevocationState
from kasou.model.selection import VMFilter
from kasou.model.spec import NetworkCreate, NetworkUpdate, VMCreate, VMUpdate, validate_name
from kasou.model.state import Action
from kasou.peers import KasouPeers, forwarded, registry_names, revoked_cache
from kasou.web import SecurityHeaders, web_routes
from kasou.wire import install_error_handlers


class CreateAccepted(BaseModel):
    vm: VMView
    job: JobRecord


class JobAccepted(BaseModel):
    job: JobRecord


class MaybeJob(BaseModel):
    job: JobRecord | None


class MigrateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    to: str | None = None
    downtime_ms: int = 100  # checked by the control plane: 1 .. 60000
    auto_converge: bool = True
    bandwidth_mib_s: int | None = None  # cap the migration stream (None: QEMU's default)


class ClusterView(BaseModel):
    clustered: bool
    leader: str | None  # the host whose control plane is active
    hosts: list[str]  # hosts that are up
    etcd_members: list[Member] | None = None  # the cluster's etcd members (kasou cluster join); None: one host
    revocation: RevocationState | None = None  # revoked certificates and the list etcd reads; None: one host


#: A server-sent event as OpenAPI 3.2 describes one (FastAPI's own schema for them, kasou.api.watches).
SSE_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "data": {"type": "string"},
        "event": {"type": "string"},
        "id": {"type": "string"},
        "retry": {"type": "integer", "minimum": 0},
    },
}

PowerAction = Action  # the path parameter; delete and template have their own routes


#: Headers of the leader's answer to a forwarded change that its caller needs (a sign-in's session cookie, how long
#: to wait, a download's name); the rest (length, encoding, the leader's own security headers) are this server's.
PASSED_BACK = ("set-cookie", "retry-after", "location", "content-disposition")


def passed_back(headers: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    """The headers of a leader's answer that go back to the caller of a forwarded change."""
    return [(k, v) for k, v in headers if k.lower() in PASSED_BACK or k.lower().startswith("x-kasou-")]


def create_app(services_factory: Callable[[], Awaitable[Services]], token: str) -> FastAPI:
    state: dict[str, Services] = {}

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        svc = await services_factory()
        await svc.start()
        state["svc"] = svc
        try:
            yield
        finally:
            await svc.close()

    async def route_permission(conn: HTTPConnection) -> None:
        """Every route's permission, from the one table (kasou.api.permissions), before the route runs."""
        method = "WS" if conn.scope["type"] == "websocket" else conn.scope["method"]
        window = await permissions.check(
            "GET" if method == "HEAD" else method,
            conn.scope["path"],
            conn.path_params,
            lambda: principal(cast(Request, conn)),
            department_of_vm,
            department_of_job,
            lambda p, kind, ident, wanted: window_for(svc(), p, kind, ident, wanted),
        )
        if window is not None:
            conn.state.window = window  # the vendor's maintenance window: in the audit record (kasou.api.audit)

    async def department_of_vm(name: str) -> str | None:
        try:
            return (await svc().vms.records.get(name)).department
        except NotFound:
            return None

    async def department_of_job(job_id: str) -> tuple[bool, str | None]:
        """Whether the job exists, and the department it belongs to (its own, not its VM name's now)."""
        try:
            job = await svc().jobs.get(job_id)
        except NotFound:
            return False, None
        return True, await svc().jobs.department_of(job)

    app = FastAPI(
        dependencies=[Depends(route_permission)],
        title="kasou",
        version=__version__,
        description="Server and desktop virtualization for hospital information systems.",
        lifespan=lifespan,
        docs_url=None,  # Swagger UI and ReDoc load their code from a CDN: not on the session cookie's origin
        redoc_url=None,
    )
    install_error_handlers(app)
    documented = app.openapi

    def openapi() -> dict[str, Any]:
        return document_api(documented())

    app.openapi = openapi  # type: ignore[method-assign]

    @app.middleware("http")
    async def forward_to_leader(request: Request, call_next: Any) -> Response:
        """In a cluster, changes are made by the leader: forward them there."""
        svc_ = state.get("svc")
        lead = svc_.leadership if svc_ is not None else None
        if lead is None or lead.is_leader or request.method in ("GET", "HEAD"):
            return cast(Response, await call_next(request))
        if request.url.path.endswith("/console-ticket"):  # kept by the server that proxies its websocket
            return cast(Response, await call_next(request))
        if request.url.path in NOT_FORWARDED:  # signed by the host that holds the site CA's key
            return cast(Response, await call_next(request))
        if not request.url.path.startswith("/v1/"):
            return cast(Response, await call_next(request))
        if not lead.leader_url:
            err = AgentUnavailable("no control plane leader is elected yet; try again in a few seconds")
            return JSONResponse(err.to_dict(), status_code=503)
        forward = ("authorization", "content-type", "cookie", CSRF_HEADER)
        headers = {k: v for k, v in request.headers.items() if k.lower() in forward}
        client = request.client.host if request.client else ""
        headers.update(sign_forwarded(token, client, request.method, request.url.path))  # the leader audits it
        mark_forwarded(request)
        url = lead.leader_url + request.url.path + (f"?{request.url.query}" if request.url.query else "")
        try:
            async with httpx.AsyncClient(timeout=120, verify=lead.tls) as c:  # mutual TLS (kasou.pki)
                r = await c.request(request.method, url, content=await request.body(), headers=headers)
        except httpx.HTTPError as e:
            request.state.audit_forwarded = False  # not handled by the leader: audited here
            err = AgentUnavailable(f"the control plane leader {lead.leader_host} does not answer: {e}")
            return JSONResponse(err.to_dict(), status_code=503)
        answer = Response(r.content, status_code=r.status_code, media_type=r.headers.get("content-type"))
        for k, v in passed_back(r.headers.multi_items()):
            answer.headers.append(k, v)
        return answer

    async def registered_hosts() -> list[str]:
        agents = state["svc"].agents if "svc" in state else None
        if agents is None:
            return []
        await agents.refresh()
        return registry_names((h, agents.record(h)) for h in agents.known())

    # a forwarded change comes from a kasou host's certificate, not from anything the site CA signed (kasou.peers)
    async def revoked_serials() -> set[int]:
        return await revocation.revoked_serials(state["svc"].store) if "svc" in state else set()

    app.add_middleware(KasouPeers, known_hosts=registered_hosts, applies=forwarded, what="a forwarded call: ",
                       revoked=revoked_cache(revoked_serials))  # fmt: skip
    app.add_middleware(BodyLimit)  # bodies over 1 MiB: 413 (kasou.api.limits), inside the audit so it is recorded
    app.middleware("http")(audit_middleware(lambda: state.get("svc"), token))  # every change recorded (kasou.api.audit)

    def svc() -> Services:
        return state["svc"]

    async def principal(request: Request) -> Principal:
        """Who asks (the root token, or a signed-in user); kept on the request for the routes."""
        known = getattr(request.state, "principal", None)
        if isinstance(known, Principal):
            return known
        h, c = request.headers, request.cookies
        p = await resolve_principal(
            h.get("authorization"),
            c.get(SESSION_COOKIE),
            h.get(CSRF_HEADER),
            request.method,
            token,
            lambda: svc().users,
        )
        request.state.principal = p
        return p

    def me(request: Request) -> Principal:
        """The principal route_permission found (every /v1 route but sign-in has one)."""
        return cast(Principal, request.state.principal)

    async def visible(request: Request, vm: str | None) -> bool:
        """May the principal see VM ``vm`` (a department-scoped one sees their departments' only)?"""
        p = me(request)
        return not p.scoped or (vm is not None and p.sees(await department_of_vm(vm)))

    v1 = APIRouter(prefix="/v1")

    @v1.get("/version")
    async def version() -> dict[str, str]:
        return {"version": __version__}

    @v1.get("/hosts")
    async def hosts() -> list[HostView]:
        return await svc().migrations.host_views()

    @v1.post("/hosts/{name}/maintenance", status_code=202)
    async def maintenance(name: str, on: bool = True) -> MaybeJob:
        return MaybeJob(job=await svc().migrations.maintenance(name, on))

    @v1.post("/vms/{name}/migrate", status_code=202)
    async def migrate(name: str, body: MigrateRequest | None = None) -> JobAccepted:
        req = body or MigrateRequest()
        job = await svc().migrations.migrate(name, req.to, req.downtime_ms, req.auto_converge, req.bandwidth_mib_s)
        return JobAccepted(job=job)

    @v1.get("/reports/uptime")
    async def report_uptime(request: Request) -> list[UptimeRow]:
        rows = []
        reach = await vendor_reach(svc(), me(request))
        for vm in await svc().vms.list_all():
            if not me(request).sees(vm.department) or (reach is not None and not reach.covers(vm.uuid, "vm.read")):
                continue
            rows.append(uptime_row(vm.name, await svc().vms.history(vm.name)))
        return rows

    async def visibility(request: Request) -> Callable[[VMView], bool]:
        """Which VMs the principal sees: their departments' (scoped users); a vendor's, those an active window of
        theirs grants vm.read on. The one rule of the list and of its watch (kasou.api.watches)."""
        p = me(request)
        reach = await vendor_reach(svc(), p)
        return lambda v: p.sees(v.department) and (reach is None or bool(reach.covers(v.uuid, "vm.read")))

    @v1.get("/vms", responses={200: {"content": {"text/event-stream": {"schema": SSE_SCHEMA}},
                                     "description": "the VMs; with watch=true: list, then added, modified, deleted, "
                                                    "timeout events (kasou.api.watches)"}})  # fmt: skip
    async def list_vms(
        request: Request, f: VMFilter = Depends(vm_filter), watch: bool = False,
        timeout: float = Query(DEFAULT_TIMEOUT_S, gt=0, le=3600),
    ) -> list[VMView]:  # fmt: skip
        """Every VM; a vendor's: their departments' VMs named by an active window of theirs that grants vm.read.
        Filters (kasou.api.bulk): ``state``, ``host``, ``department``, ``tag`` (repeated: VMs with all of them).
        ``watch=true``: a stream of server-sent events instead (the list, then each change, for ``timeout``
        seconds; ``kasou.api.watches``)."""
        del watch, timeout  # a watch is answered by kasou.api.watches, routed there before this route
        sees = await visibility(request)
        return keep([v for v in await svc().vms.list_all() if sees(v)], f)

    def check_priority_ceiling(p: Principal, priority: int) -> None:
        """A vendor's VMs go no higher in the HA restart order than the ceiling (KASOU_VENDOR_MAX_PRIORITY)."""
        ceiling = vendor_max_priority()
        if p.scoped and priority > ceiling:
            raise Forbidden(
                f"user {p.name!r} ({p.role.value}) may set an HA priority up to {ceiling}, not {priority}; "
                "an administrator sets a higher one"
            )

    @v1.post("/vms", status_code=202)
    async def create_vm(request: Request, body: dict[str, Any] = Body(...)) -> CreateAccepted:
        spec = VMCreate.parse(body)
        p = me(request)
        scope: tuple[str, ...] | None = None
        if p.scoped:
            await create_window(svc(), p, request)  # inside an active window granting operate
            scope = p.departments
            if spec.department is None and len(p.departments) == 1:
                spec = spec.model_copy(update={"department": p.departments[0]})
            if not p.sees(spec.department):
                mine = ", ".join(p.departments)
                raise Forbidden(f"user {p.name!r} may create VMs of their departments only ({mine}): give --department")
            if spec.template is not None and not await visible(request, spec.template):
                raise NotFound(f"no template named {spec.template!r}")
            if "priority" not in spec.model_fields_set:  # the default, under the ceiling
                spec = spec.model_copy(update={"priority": min(spec.priority, vendor_max_priority())})
            check_priority_ceiling(p, spec.priority)
        vm, job = await svc().vms.create(spec, scope)
        return CreateAccepted(vm=vm, job=job)

    @v1.get("/vms/{name}")
    async def get_vm(name: str) -> VMView:
        return await svc().vms.get(name)

    @v1.patch("/vms/{name}")
    async def update_vm(request: Request, name: str, body: dict[str, Any] = Body(...)) -> VMView:
        upd = VMUpdate.parse(body)
        p = me(request)
        if p.scoped:
            if upd.department is not None and (upd.department or None) != await department_of_vm(name):
                raise Forbidden(
                    f"user {p.name!r} ({p.role.value}) may not change a VM's department; an administrator does"
                )
            if upd.priority is not None:
                check_priority_ceiling(p, upd.priority)
        return await svc().vms.update(name, upd)

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

    @v1.get("/networks")
    async def list_networks() -> list[NetworkView]:
        return await svc().networks.list()

    @v1.post("/networks", status_code=201)
    async def create_network(body: dict[str, Any] = Body(...)) -> NetworkView:
        return await svc().networks.create(NetworkCreate.parse(body))

    @v1.get("/networks/{name}")
    async def get_network(name: str) -> NetworkView:
        return await svc().networks.get(name)

    @v1.patch("/networks/{name}")
    async def update_network(name: str, body: dict[str, Any] = Body(...)) -> NetworkView:
        """Which departments' VMs may use the network (``departments``: a list, or null for every department);
        refused (409) while a VM of a department left out is on it."""
        return await svc().networks.update(name, NetworkUpdate.parse(body))

    @v1.delete("/networks/{name}")
    async def delete_network(name: str) -> NetworkView:
        """Refused (409) while a VM has a NIC on it."""
        return await svc().networks.delete(name)

    @v1.get("/events", responses={200: {"content": {"text/event-stream": {"schema": SSE_SCHEMA}},
                                        "description": "the events; with watch=true: list, then event and timeout "
                                                       "events (kasou.api.watches)"}})  # fmt: skip
    async def list_events(
        subject: str | None = None, severity: Severity | None = None, limit: int = Query(200, ge=1, le=5000),
        watch: bool = False, timeout: float = Query(DEFAULT_TIMEOUT_S, gt=0, le=3600),
    ) -> list[Event]:  # fmt: skip
        """What an operator must hear of (degraded disks, pools low on space, failed backups), oldest first.
        ``watch=true``: a stream of server-sent events instead (the list, then each new event, for ``timeout``
        seconds; ``kasou.api.watches``)."""
        del watch, timeout  # a watch is answered by kasou.api.watches
        return await svc().vms.events.list(subject, severity, limit)

    @v1.get("/events/active")
    async def active_events() -> list[Event]:
        """Conditions raised and not over yet."""
        return await svc().vms.events.active()

    @v1.get("/jobs")
    async def list_jobs(
        request: Request, vm: str | None = None, limit: int = Query(50, ge=1, le=1000)
    ) -> list[JobRecord]:
        if vm is not None:
            validate_name(vm)
        jobs = await svc().jobs.list(vm, limit)
        if not me(request).scoped:
            return jobs
        reach = await vendor_reach(svc(), me(request))  # and, for a vendor, of a VM of an active window
        return [j for j in jobs if me(request).sees(await svc().jobs.department_of(j))  # the job's own department
                and (reach is None or reach.covers(j.vm_uuid, "vm.read"))]  # fmt: skip

    @v1.get("/jobs/{job_id}")
    async def get_job(job_id: str) -> JobRecord:
        return await svc().jobs.get(job_id)

    @v1.post("/jobs/{job_id}/cancel")
    async def cancel_job(job_id: str) -> JobRecord:
        return await svc().jobs.cancel(job_id)

    @v1.get("/cluster")
    async def cluster() -> ClusterView:
        lead = svc().leadership
        if lead is None:
            names = svc().agents.names()
            return ClusterView(clustered=False, leader=names[0] if names else None, hosts=names)
        await svc().agents.refresh(force=True)
        members, etcd = None, svc().membership
        if etcd is not None:
            members = members_of(await etcd.member_list())
        return ClusterView(clustered=True, leader=lead.leader_host, hosts=svc().agents.names(), etcd_members=members,
                           revocation=await revocation.state(svc().store))  # fmt: skip

    v1.include_router(snapshot_router(svc))
    v1.include_router(media_router(svc))  # the CD drive
    v1.include_router(storage_routes(svc))
    v1.include_router(device_routes(svc))  # disks and NICs added, grown, removed
    app.include_router(user_routes(svc, principal))
    app.include_router(directory_routes(svc, principal))  # /v1/directory: sign-in with the hospital's directory
    app.include_router(console_routes(svc, principal, token))  # console tickets and the websocket proxy
    app.include_router(audit_routes(svc, principal))  # /v1/audit: auditors and administrators
    app.include_router(recording_routes(svc, principal))  # /v1/recordings: console recordings (audit)
    app.include_router(cluster_routes(svc, principal))  # /v1/cluster/join, leave, tokens: hosts join and leave
    app.include_router(bulk_routes(svc, principal))  # /v1/vms/actions/{action}: many VMs as one job
    app.include_router(window_routes(svc, principal))  # /v1/maintenance-windows: vendors' maintenance windows
    app.include_router(portal_routes(svc, principal))
    v1.include_router(desktop_pool_routes(svc))
    v1.include_router(backup_router(svc))
    v1.include_router(balance_routes(svc))  # /v1/cluster/balance: the load balancer
    v1.include_router(transfer_routes(svc))  # vm import and export
    v1.include_router(notify_routes(svc))  # /v1/notify: mail, webhooks, syslog (kasou.control.notify)

    async def recheck(request: Request) -> None:
        """A long stream's credentials and permission, checked again (a session signed out since: refused)."""
        request.state.principal = None
        await route_permission(request)

    app.include_router(
        watch_routes(svc, visibility, recheck)
    )  # ?watch=true on /v1/vms and /v1/events: before the plain ones
    app.include_router(v1)
    app.include_router(live_routes(svc, principal))  # server-sent events: job progress, operator events
    app.include_router(metrics_routes(svc, principal))  # /metrics (Prometheus), /v1/metrics, /v1/metrics/history

    @app.get("/", include_in_schema=False)
    async def root() -> JSONResponse:
        return JSONResponse({"name": "kasou", "version": __version__, "api": "/v1", "openapi": "/openapi.json",
                             "ui": "/ui/"})  # fmt: skip

    app.include_router(web_routes())
    app.add_middleware(SecurityHeaders)  # CSP, nosniff, no framing, no referrer on every answer (kasou.web)

    return app
