"""``/v1/maintenance-windows``: vendors' maintenance windows (:mod:`kasou.control.maintenance`), and what a vendor
may reach through them (:func:`window_for`, asked by the permission check; :func:`vendor_reach`, used by the
routes that list VMs and jobs or create VMs).

A vendor (the ``vendor`` role) acts on a VM or its jobs only inside an active window of theirs that names the VM
and grants the permission the route needs; outside one, every route naming a VM or a job answers 403 with one
line, lists (``/v1/vms``, ``/v1/jobs``, ``/v1/reports/uptime``) show only the VMs of their active windows that
grant ``vm.read``, and creating or importing a VM needs an active window granting ``operate``. The windows
themselves (list, show, request, revoke their own) are open to them at all times.

A department's manager (the ``manager`` role) is scoped to their departments like a vendor but is not confined to
windows: they see the windows naming a VM of their departments (others answer 404), request them for a vendor of
their department, and approve, deny or revoke those whose VMs are all of their departments (403 otherwise).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Body, Request

from kasou.api.auth import Principal
from kasou.control.maintenance import visible
from kasou.control.records import JobRecord
from kasou.errors import Forbidden, NotFound
from kasou.model.maintenance import WindowRecord, WindowReport, WindowRequest, WindowView, check_id
from kasou.model.users import WINDOW_ROLES

if TYPE_CHECKING:
    from kasou.api.deps import Services


def refused(p: Principal, what: str, wanted: tuple[str, ...]) -> Forbidden:
    needs = " or ".join(repr(x) for x in wanted)
    return Forbidden(
        f"user {p.name!r} (vendor) acts on {what} only inside an approved, active maintenance window that names it "
        f"and grants {needs}; none is active now (kasou maintenance-window request)"
    )


async def window_for(svc: Services, p: Principal, kind: str, ident: str, wanted: tuple[str, ...]) -> str | None:
    """The active window of vendor ``p`` that covers the VM named ``ident`` (``kind`` "vm") or the VM of job
    ``ident`` ("job") for one of ``wanted``; None for a principal not confined to windows; Forbidden when none
    does."""
    if p.role not in WINDOW_ROLES:
        return None
    uuid: str | None = None
    if kind == "vm":
        try:
            uuid = (await svc.vms.records.get(ident)).uuid
        except NotFound:
            uuid = None
        what = f"VM {ident!r}"
    else:
        job: JobRecord = await svc.jobs.get(ident)
        uuid = job.vm_uuid
        what = f"job {ident!r} (of VM {job.vm!r})"
    wid = await svc.windows.grant(p.name, uuid, wanted)
    if wid is None:
        raise refused(p, what, wanted)
    return wid


@dataclass
class Reach:
    """What a vendor reaches now through their active windows."""

    windows: list[WindowRecord]
    now: float

    def covers(self, vm_uuid: str | None, *wanted: str) -> str | None:
        for w in self.windows:
            if w.grants(vm_uuid, wanted, self.now):
                return w.id
        return None

    def any_granting(self, *wanted: str) -> str | None:
        for w in self.windows:
            if w.is_active(self.now) and any(x in w.permissions for x in wanted):
                return w.id
        return None


async def vendor_reach(svc: Services, p: Principal) -> Reach | None:
    """A vendor's reach through their windows; None for everyone else."""
    if p.role not in WINDOW_ROLES:
        return None
    return Reach(await svc.windows.active_for(p.name), svc.windows.clock())


async def create_window(svc: Services, p: Principal, request: Request) -> str | None:
    """A vendor creates or imports a VM only inside an active window granting ``operate`` (its id, recorded)."""
    reach = await vendor_reach(svc, p)
    if reach is None:
        return None
    wid = reach.any_granting("operate")
    if wid is None:
        raise refused(p, "new VMs", ("operate",))
    request.state.window = wid
    return wid


def window_routes(svc: Callable[[], Services], principal: Callable[[Request], Awaitable[Principal]]) -> APIRouter:
    r = APIRouter(prefix="/v1/maintenance-windows")

    async def own(p: Principal, window_id: str) -> WindowView:
        """The window, if the principal may see it (a vendor: their own; a manager: those naming a VM of their
        departments; others: any)."""
        w = await svc().windows.get(check_id(window_id))
        if not visible(w, p.name, p.role, p.departments):
            raise NotFound(f"no maintenance window {window_id!r}")
        return w

    @r.get("")
    async def list_windows(request: Request) -> list[WindowView]:
        """Every window (a vendor: their own; a manager: those naming a VM of their departments), by start."""
        p = await principal(request)
        return await svc().windows.views_for(p.name, p.role, p.departments)

    @r.post("", status_code=201)
    async def request_window(request: Request, body: dict[str, Any] = Body(...)) -> WindowView:
        """Request a window (state ``requested``): a vendor for themselves, an administrator or operator for any
        vendor, a manager for a vendor of their department.
        ``starts_at``/``ends_at`` are UNIX times; ``permissions`` default to all the vendor role holds."""
        p = await principal(request)
        spec = WindowRequest.parse(body, svc().windows.clock())
        return await svc().windows.request(spec, p.name, p.role, p.departments)

    @r.get("/{window}")
    async def show_window(request: Request, window: str) -> WindowView:
        return await own(await principal(request), window)

    @r.get("/{window}/report")
    async def window_report(request: Request, window: str) -> WindowReport:
        """What was done under the window (the audit records carrying its id), against its stated plan."""
        await own(await principal(request), window)
        return await svc().windows.report(window)

    @r.post("/{window}/approve")
    async def approve_window(request: Request, window: str) -> WindowView:
        """An administrator, or a manager of every department whose VMs it names, who did not request it (and is not
        its vendor) approves a requested window."""
        p = await principal(request)
        return await svc().windows.approve(check_id(window), p.name, p.role, p.departments)

    @r.post("/{window}/deny")
    async def deny_window(request: Request, window: str) -> WindowView:
        """An administrator, or a manager of every department whose VMs it names, denies a requested window."""
        p = await principal(request)
        return await svc().windows.deny(check_id(window), p.name, p.role, p.departments)

    @r.post("/{window}/revoke")
    async def revoke_window(request: Request, window: str) -> WindowView:
        """End a requested or approved window now (its vendor's access ends with it, consoles included)."""
        p = await principal(request)
        await own(p, window)
        return await svc().windows.revoke(check_id(window), p.name, p.role, p.departments)

    return r
