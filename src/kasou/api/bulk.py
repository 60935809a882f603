"""``POST /v1/vms/actions/{action}``: start, shut down or stop the VMs a selector picks, as one job
(:mod:`kasou.control.bulk`), and the filters of ``GET /v1/vms``.

Who is touched: the VMs the caller may see (a department-scoped principal's departments only) that the
selector picks. A **vendor** acts only inside one active maintenance window of theirs that grants ``operate``
(the ``window`` of the selector, or their only such window): the job touches only the VMs that window names,
of their departments, asks again before each VM whether the window still grants it (a window that ends stops
the rest), and its id goes into the request's audit record. Without such a window: 403, nothing done. VMs
out of reach are not named in the result (a vendor learns nothing of them).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from fastapi import APIRouter, Request
from pydantic import BaseModel

from kasou.api.auth import Principal
from kasou.api.windows import refused, vendor_reach
from kasou.control.base import VMView
from kasou.control.records import JobRecord
from kasou.errors import Forbidden, NotFound
from kasou.model.maintenance import check_id
from kasou.model.selection import BulkAction, BulkSelector, VMFilter

if TYPE_CHECKING:
    from kasou.api.deps import Services


class BulkAccepted(BaseModel):
    job: JobRecord
    vms: list[str]  # the VMs selected (the job's result says what became of each)


def keep(views: list[VMView], f: VMFilter) -> list[VMView]:
    return [v for v in views if f.matches(v.state, v.host, v.department, v.tags)]


def bulk_routes(svc: Callable[[], Services], principal: Callable[[Request], Awaitable[Principal]]) -> APIRouter:
    r = APIRouter(prefix="/v1/vms/actions")

    @r.post("/{action}", status_code=202)
    async def bulk_action(request: Request, action: BulkAction, body: BulkSelector | None = None) -> BulkAccepted:
        """Start, shut down or stop many VMs as one job. The body selects them: ``names``, ``tags`` (all of them),
        ``host``, ``department``, ``state``, or ``all`` (nothing else: refused, so nothing starts by accident);
        ``per_host``: operations at once on one host; ``timeout``: a shutdown's wait per VM. The job's result
        lists each VM's outcome (succeeded, failed with why, skipped with why)."""
        sel = BulkSelector.parse(body.model_dump(exclude_unset=True) if body is not None else {})
        p = await principal(request)
        views = [v for v in await svc().vms.list_all() if p.sees(v.department)]
        owner: tuple[str | None, str | None] | None = None
        guard = None
        reach = await vendor_reach(svc(), p)
        if reach is not None:
            mine = [w for w in reach.windows if w.is_active(reach.now) and "operate" in w.permissions]
            if sel.window is not None:
                mine = [w for w in mine if w.id == check_id(sel.window)]
            if not mine:
                raise refused(p, "VMs", ("operate",))
            if len(mine) > 1:
                ids = ", ".join(w.id for w in mine)
                raise Forbidden(f"user {p.name!r} has several active windows ({ids}): name the one to act under "
                                "(--window ID)")  # fmt: skip
            w = mine[0]
            request.state.window = w.id  # in the audit record (kasou.api.audit)
            uuids = set(w.vm_uuids.values())
            views = [v for v in views if v.uuid in uuids]
            owner = (sorted(uuids)[0] if uuids else None, p.departments[0] if len(p.departments) == 1 else None)
            if len({v.department for v in views}) == 1:
                owner = (owner[0], views[0].department)
            windows = svc().windows

            async def guard(v: VMView) -> str | None:
                if await windows.grant(p.name, v.uuid, ("operate",)) is None:
                    return f"maintenance window {w.id} no longer grants {p.name!r} operate on VM {v.name!r}"
                return None

        elif sel.window is not None:
            raise NotFound(f"no active maintenance window {sel.window!r} of user {p.name!r}")
        missing = sorted(set(sel.names) - {v.name for v in views})
        if missing:
            raise NotFound(f"no VM named {missing[0]!r}")
        chosen = [v for v in views if sel.picks(v.name, v.state, v.host, v.department, v.tags)]
        job = await svc().vms.bulk.run(action, chosen, sel.per_host, sel.timeout, guard, owner)
        return BulkAccepted(job=job, vms=[v.name for v in chosen])

    return r
