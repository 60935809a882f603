"""The permission every API route needs, in one table, checked before any route runs.

Every HTTP and websocket route of the API is a key of :data:`ROUTES` (method and path template),
or falls under one of :data:`PREFIXES`; a route in neither is refused to everyone (fail closed),
and ``tests/functional/test_role_matrix.py`` enumerates the app's routes to prove there is none.
What each role holds is :data:`kasou.model.users.PERMISSIONS`.

A department-scoped principal (a vendor, a manager) holds its VM permissions only for VMs whose
``department`` is one of theirs: for a route naming a VM (``vm``) the check looks the VM up, for
one naming a job (``job``) it takes the department the job itself carries (the department of its
VM when it was submitted: a later VM of the same name owns none of an earlier one's jobs), and a
VM or job of another department is answered as if it did not exist (404), so a vendor learns
nothing of other departments' systems. Routes marked ``lists`` filter what they
return (or, for a create, check the department asked for) themselves; any other route is refused
to a scoped principal even if the role holds its permission.

A vendor (not a manager) also needs an active maintenance window (:mod:`kasou.control.maintenance`) for every route
naming a VM or a job of their departments: the ``window`` callback of :func:`check` answers the id
of a window that names the VM and grants the permission (recorded with the request in the audit
log), or refuses (403) with one line saying that no such window is active.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import cache
from typing import TYPE_CHECKING

from kasou.errors import Forbidden, NotFound

if TYPE_CHECKING:
    from kasou.api.auth import Principal

PUBLIC = "public"  # no sign-in (the sign-in itself; the console websocket, which takes a one-time ticket)
SIGNED_IN = "signed-in"  # anyone signed in (their own session: who am I, sign out)


@dataclass(frozen=True)
class Need:
    """What a route needs: one of ``anyof`` (a permission, PUBLIC or SIGNED_IN) and its scope."""

    anyof: tuple[str, ...]
    vm: str | None = None  # the path parameter naming a VM (department scope)
    job: str | None = None  # the path parameter naming a job (the department the job carries)
    lists: bool = False  # the route itself keeps a scoped principal to their departments' VMs

    @property
    def public(self) -> bool:
        return PUBLIC in self.anyof


def need(*anyof: str, vm: str | None = None, job: str | None = None, lists: bool = False) -> Need:
    return Need(anyof, vm, job, lists)


#: (method, path template) -> what the route needs. "WS" is a websocket route.
ROUTES: dict[tuple[str, str], Need] = {
    # who am I, sign in and out
    ("POST", "/v1/auth/login"): need(PUBLIC),
    ("POST", "/v1/auth/logout"): need(SIGNED_IN),
    ("GET", "/v1/auth/me"): need(SIGNED_IN),
    ("POST", "/v1/auth/me/password"): need(SIGNED_IN),  # one's own, with the current password
    ("POST", "/v1/auth/me/totp"): need(SIGNED_IN),
    ("POST", "/v1/auth/me/totp/confirm"): need(SIGNED_IN),
    ("GET", "/v1/version"): need(SIGNED_IN),
    # directory sign-in (LDAP / Active Directory): administrators; its status for the sign-in page
    ("GET", "/v1/directory/status"): need(PUBLIC),  # ok, unreachable or off: nothing of any user
    ("GET", "/v1/directory"): need("users"),
    ("PUT", "/v1/directory"): need("users"),
    ("DELETE", "/v1/directory"): need("users"),
    ("PUT", "/v1/directory/mappings/{group}"): need("users"),
    ("DELETE", "/v1/directory/mappings/{group}"): need("users"),
    ("POST", "/v1/directory/test"): need("users"),
    # VMs and what belongs to them
    ("GET", "/v1/vms"): need("vm.read", lists=True),
    ("POST", "/v1/vms"): need("operate", lists=True),
    ("GET", "/v1/vms/{name}"): need("vm.read", vm="name"),
    ("PATCH", "/v1/vms/{name}"): need("operate", vm="name"),
    ("DELETE", "/v1/vms/{name}"): need("operate", vm="name"),
    ("POST", "/v1/vms/{name}/actions/{action}"): need("operate", vm="name"),
    ("POST", "/v1/vms/actions/{action}"): need("operate", lists=True),  # a vendor: one window's VMs (kasou.api.bulk)
    ("POST", "/v1/vms/{name}/template"): need("operate", vm="name"),
    ("GET", "/v1/vms/{name}/console"): need("vm.read", vm="name"),
    ("GET", "/v1/vms/{name}/history"): need("vm.read", vm="name"),
    ("POST", "/v1/vms/{name}/console-ticket"): need("console", "portal", vm="name"),  # portal: own desktop only
    ("WS", "/v1/console/ws"): need(PUBLIC),  # the one-time ticket made by console-ticket, bound to its session
    ("POST", "/v1/vms/{name}/media"): need("operate", vm="name"),
    ("DELETE", "/v1/vms/{name}/media"): need("operate", vm="name"),
    ("GET", "/v1/vms/{name}/snapshots"): need("vm.read", vm="name"),
    ("POST", "/v1/vms/{name}/snapshots"): need("operate", vm="name"),
    ("GET", "/v1/vms/{name}/snapshots/{snapshot}"): need("vm.read", vm="name"),
    ("POST", "/v1/vms/{name}/snapshots/{snapshot}/revert"): need("operate", vm="name"),
    ("DELETE", "/v1/vms/{name}/snapshots/{snapshot}"): need("operate", vm="name"),
    ("GET", "/v1/vms/{name}/backups"): need("vm.read", vm="name"),
    ("POST", "/v1/vms/{name}/backups"): need("operate", vm="name"),
    ("POST", "/v1/vms/{name}/backups/{generation}/restore"): need("operate", vm="name"),
    ("GET", "/v1/vms/{name}/backups/server"): need("vm.read", vm="name"),
    ("POST", "/v1/vms/{name}/backups/{generation}/file"): need("hosts"),
    ("GET", "/v1/backup-server"): need("read"),
    ("GET", "/v1/backups/status"): need("read"),
    ("PUT", "/v1/backup-server"): need("hosts"),
    ("DELETE", "/v1/backup-server"): need("hosts"),
    ("POST", "/v1/backup-server/isolate"): need("hosts"),
    ("POST", "/v1/backup-server/restore-plan"): need("hosts"),
    ("POST", "/v1/backup-server/drill"): need("hosts"),
    ("GET", "/v1/backup-server/drills"): need("read"),
    ("GET", "/v1/vms/{name}/backup-policy"): need("vm.read", vm="name"),
    ("PATCH", "/v1/vms/{name}/backup-policy"): need("operate", vm="name"),
    ("GET", "/v1/backup-policies"): need("read"),
    ("GET", "/v1/departments/{department}/backup-policy"): need("read"),
    ("PATCH", "/v1/departments/{department}/backup-policy"): need("hosts"),
    ("POST", "/v1/vms/{name}/disks/{disk_id}/rebuild"): need("operate", vm="name"),
    ("POST", "/v1/vms/{name}/disks"): need("operate", vm="name"),
    ("DELETE", "/v1/vms/{name}/disks/{disk_id}"): need("operate", vm="name"),
    ("POST", "/v1/vms/{name}/disks/{disk_id}/resize"): need("operate", vm="name"),
    ("POST", "/v1/vms/{name}/nics"): need("operate", vm="name"),
    ("DELETE", "/v1/vms/{name}/nics/{nic_id}"): need("operate", vm="name"),
    ("POST", "/v1/vms/{name}/migrate"): need("hosts"),  # the choice of a host is a host operation
    ("POST", "/v1/imports"): need("operate", lists=True),  # the route keeps a vendor to their departments
    ("POST", "/v1/vms/{name}/export"): need("operate", vm="name"),
    ("GET", "/v1/reports/uptime"): need("vm.read", lists=True),
    # vendors' maintenance windows: a vendor sees and requests their own (kasou.api.windows)
    ("GET", "/v1/maintenance-windows"): need("vm.read", lists=True),
    ("POST", "/v1/maintenance-windows"): need("operate", "approve", lists=True),  # a manager: for their vendors
    ("GET", "/v1/maintenance-windows/{window}"): need("vm.read", lists=True),
    ("GET", "/v1/maintenance-windows/{window}/report"): need("vm.read", lists=True),
    # approved, denied by an administrator or a manager of every department it names; never by its requester
    ("POST", "/v1/maintenance-windows/{window}/approve"): need("approve", lists=True),
    ("POST", "/v1/maintenance-windows/{window}/deny"): need("approve", lists=True),
    ("POST", "/v1/maintenance-windows/{window}/revoke"): need("operate", "approve", lists=True),  # a vendor: their own
    # jobs
    ("GET", "/v1/jobs"): need("vm.read", lists=True),
    ("GET", "/v1/jobs/{job_id}"): need("vm.read", job="job_id"),
    ("POST", "/v1/jobs/{job_id}/cancel"): need("operate", job="job_id"),
    ("GET", "/v1/jobs/{job_id}/events"): need("vm.read", job="job_id"),
    # hosts, cluster, networks, storage and desktop pools
    ("GET", "/v1/hosts"): need("read"),
    # the load balancer (kasou.api.balance)
    ("POST", "/v1/cluster/balance"): need("hosts"),  # also a dry run: it measures every host
    ("GET", "/v1/cluster/balance/settings"): need("read"),
    ("PUT", "/v1/cluster/balance/settings"): need("hosts"),
    ("POST", "/v1/hosts/{name}/maintenance"): need("hosts"),
    ("GET", "/v1/cluster"): need("read"),
    # joining hosts (kasou.api.cluster): the CA is public; a join is authenticated by its one-time join token;
    # a join token hands out the site's secrets, so only administrators make one or remove a host
    ("GET", "/v1/cluster/ca"): need(PUBLIC),
    ("POST", "/v1/cluster/join"): need(PUBLIC),
    ("POST", "/v1/cluster/tokens"): need("users"),
    ("POST", "/v1/cluster/leave"): need("users"),
    ("POST", "/v1/cluster/remove"): need("users"),
    ("GET", "/v1/networks"): need("read"),
    ("POST", "/v1/networks"): need("hosts"),
    ("GET", "/v1/networks/{name}"): need("read"),
    ("PATCH", "/v1/networks/{name}"): need("hosts"),  # which departments' VMs may use it
    ("DELETE", "/v1/networks/{name}"): need("hosts"),
    ("GET", "/v1/pools"): need("read"),
    ("POST", "/v1/pools"): need("hosts"),
    ("GET", "/v1/pools/{pool}"): need("read"),
    ("DELETE", "/v1/pools/{pool}"): need("hosts"),
    ("GET", "/v1/desktop-pools"): need("read"),
    ("POST", "/v1/desktop-pools"): need("hosts"),
    ("GET", "/v1/desktop-pools/{pool}"): need("read"),
    ("PATCH", "/v1/desktop-pools/{pool}"): need("hosts"),
    ("DELETE", "/v1/desktop-pools/{pool}"): need("hosts"),
    # what an operator must hear of, live updates, metrics
    ("GET", "/v1/events"): need("read"),
    ("GET", "/v1/events/active"): need("read"),
    ("GET", "/v1/events/stream"): need("read"),
    ("GET", "/v1/notify/status"): need("read"),  # the channels, never a secret
    ("POST", "/v1/notify/test"): need("users"),  # administrators: it sends to every receiver
    ("GET", "/metrics"): need("read"),
    ("GET", "/v1/metrics"): need("read"),
    ("GET", "/v1/metrics/history"): need("read"),
    # the audit log: auditors and administrators (and a department's manager, its review)
    ("GET", "/v1/audit/records"): need("audit", "users"),
    ("GET", "/v1/audit/verify"): need("audit", "users"),
    ("GET", "/v1/audit/export"): need("audit", "users"),
    ("GET", "/v1/audit/public-key"): need("audit", "users"),
    ("POST", "/v1/audit/checkpoint"): need("audit", "users"),
    ("GET", "/v1/audit/status"): need("audit", "users"),
    ("GET", "/v1/audit/review"): need("audit", "users", lists=True),  # a manager: their departments' only
    # console recordings (kasou.api.recordings): auditors and administrators
    ("GET", "/v1/recordings"): need("audit"),
    ("GET", "/v1/recordings/{rec_id}"): need("audit"),
    ("POST", "/v1/recordings/{rec_id}/hold"): need("audit"),
    ("GET", "/v1/recordings/{rec_id}/stream"): need("audit"),
    ("GET", "/v1/recordings/{rec_id}/export"): need("audit"),
    # the desktop portal: clinicians (and staff who test it)
    ("GET", "/v1/portal/pools"): need("portal"),
    ("GET", "/v1/portal/desktop"): need("portal"),
    ("POST", "/v1/portal/desktop"): need("portal"),
    ("POST", "/v1/portal/desktop/release"): need("portal"),
    # the web UI's pages and noVNC's files: no data (the pages sign in through the API)
    ("GET", "/"): need(PUBLIC),
    ("GET", "/ui/"): need(PUBLIC),
    ("GET", "/ui/{path:path}"): need(PUBLIC),
    ("GET", "/ui/novnc/{path:path}"): need(PUBLIC),
}

#: Path prefixes whose routes all need the same (checked after :data:`ROUTES`).
PREFIXES: tuple[tuple[str, Need], ...] = (
    ("/v1/users", need("users")),  # user management: administrators
)

#: FastAPI's own pages (the OpenAPI document and its viewers), which carry no data.
PUBLIC_PAGES = frozenset({"/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"})


def need_of(method: str, template: str) -> Need | None:
    """What the route ``method template`` (e.g. ``GET /v1/vms/{name}``) needs; None if not stated."""
    found = ROUTES.get((method, template))
    if found is not None:
        return found
    for prefix, n in PREFIXES:
        if template == prefix or template.startswith(prefix + "/"):
            return n
    return None


@cache
def _patterns() -> list[tuple[str, str, re.Pattern[str]]]:
    out = []
    for method, template in ROUTES:
        rx = ""
        for part in re.split(r"(\{\w+(?::path)?\})", template):
            if part.startswith("{"):
                name, _, kind = part[1:-1].partition(":")
                rx += f"(?P<{name}>.*)" if kind == "path" else f"(?P<{name}>[^/]+)"
            else:
                rx += re.escape(part)
        out.append((method, template, re.compile(rx + "$")))
    return out


def template_of(method: str, path: str) -> str:
    """The route template a request path falls under (the path itself if none: prefixes decide)."""
    for m, template, rx in _patterns():
        if m == method and rx.match(path):
            return template
    return path


async def check(
    method: str,
    path: str,
    params: dict[str, str],
    principal: Callable[[], Awaitable[Principal]],
    department_of_vm: Callable[[str], Awaitable[str | None]],
    department_of_job: Callable[[str], Awaitable[tuple[bool, str | None]]],
    window: Callable[[Principal, str, str, tuple[str, ...]], Awaitable[str | None]] | None = None,
) -> str | None:
    """Refuse the request unless its principal holds what the route needs (kasou.errors on refusal).

    ``path`` is the request's path; it is matched against the table's templates.
    ``department_of_job`` answers (the job exists, the department it belongs to). ``window`` is asked, for a
    scoped principal on a route naming a VM (``"vm"``, its name) or a job (``"job"``, its id) of their
    departments, which maintenance window lets them do it (its id);
    it raises Forbidden when none does. The answer is that window's id.
    """
    path = template_of(method, path)
    n = need_of(method, path)
    if n is None:
        raise Forbidden(f"{method} {path} states no permission (kasou.api.permissions): refused to everyone")
    if n.public:
        return None
    p = await principal()
    if SIGNED_IN in n.anyof:
        return None
    if not any(p.can(x) for x in n.anyof):
        needs = " or ".join(repr(x) for x in n.anyof)
        raise Forbidden(f"user {p.name!r} ({p.role.value}) may not do this (needs {needs})")
    if not p.scoped or n.lists:
        return None
    if n.vm is not None:
        vm = params.get(n.vm)
        if vm is None or not p.sees(await department_of_vm(vm)):
            raise NotFound(f"no VM named {vm!r}")
        return await window(p, "vm", vm, n.anyof) if window is not None else None
    elif n.job is not None:
        job = params.get(n.job, "")
        found, department = await department_of_job(job)
        if not found or not p.sees(department):
            raise NotFound(f"no job {job!r}")
        return await window(p, "job", job, n.anyof) if window is not None else None
    else:
        raise Forbidden(f"user {p.name!r} ({p.role.value}) manages only their departments' VMs, not this")
