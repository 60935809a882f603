"""Users and roles: who may sign in to kasou, and what each role may do.

Roles:

* ``admin``: everything, users included;
* ``operator``: run, migrate and maintain VMs and hosts, open any console; no user management;
* ``vendor``: a department system's vendor: full control of the VMs tagged with one of their
  departments (start, stop, snapshots, backups, console), but only inside an approved maintenance
  window that names the VM (:mod:`kasou.model.maintenance`), nothing of other departments' VMs (they
  are not even listed), no host, network, pool or cluster operations;
* ``auditor``: read everything (the audit log and the reports included), change nothing, no console;
* ``manager``: a department's manager: reads the VMs of their departments (no operation, no console),
  requests, approves, denies and revokes the maintenance windows of their departments (never one they
  requested), and runs the access-log review (``kasou audit review``) for their departments;
* ``clinician``: the desktop portal only (a desktop of the pools they are entitled to, its console).

The permission each API route needs is stated in one table, :mod:`kasou.api.permissions`.

The API's root token (``$KASOU_HOME/api.token``) acts as an administrator for scripts on the host.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from kasou.errors import InvalidSpec
from kasou.model.names import validate_name
from kasou.model.parsing import parse_model

PASSWORD_MIN = 10
PASSWORD_MAX = 1024
#: Names no user may have: the root API token acts as "root", the emergency account is "break-glass".
RESERVED_NAMES = frozenset({"root", "break-glass"})


class Role(StrEnum):
    ADMIN = "admin"
    OPERATOR = "operator"
    VENDOR = "vendor"
    AUDITOR = "auditor"
    CLINICIAN = "clinician"
    MANAGER = "manager"


#: What each role may do, by permission name. Routes name the permission they need.
#:
#: * ``read``: read everything (hosts, networks, pools, events, metrics, every VM);
#: * ``vm.read``: read VMs, their jobs, history, snapshots and backups;
#: * ``operate``: change VMs (create, power, snapshots, backups, rebuild a disk);
#: * ``hosts``: host, network, storage pool, desktop pool and cluster operations, migration;
#: * ``console``: open a VM's console; ``users``: manage users; ``audit``: read the audit log;
#: * ``portal``: the desktop portal; ``approve``: approve, deny and revoke vendors' maintenance windows.
#:
#: A department-scoped role (vendor, manager) holds its permissions only for VMs whose ``department``
#: is one of the user's (and, for a manager, the windows and the access-log review of those departments).
PERMISSIONS: dict[Role, frozenset[str]] = {
    Role.ADMIN: frozenset({"read", "vm.read", "operate", "hosts", "console", "users", "portal", "audit", "approve"}),
    Role.OPERATOR: frozenset({"read", "vm.read", "operate", "hosts", "console", "portal"}),
    Role.VENDOR: frozenset({"vm.read", "operate", "console"}),
    Role.AUDITOR: frozenset({"read", "vm.read", "audit"}),
    Role.CLINICIAN: frozenset({"portal"}),
    Role.MANAGER: frozenset({"vm.read", "approve", "audit"}),
}

#: Roles whose VM permissions hold only within their departments.
SCOPED_ROLES = frozenset({Role.VENDOR, Role.MANAGER})
#: Roles that act on a VM only inside an approved maintenance window naming it (kasou.model.maintenance).
WINDOW_ROLES = frozenset({Role.VENDOR})


def check_password(password: object) -> str:
    if not isinstance(password, str) or not PASSWORD_MIN <= len(password) <= PASSWORD_MAX:
        raise InvalidSpec(f"a password has {PASSWORD_MIN} to {PASSWORD_MAX} characters", field="password")
    if password.strip() != password or "\n" in password:
        raise InvalidSpec("a password may not start or end with spaces or hold a line break", field="password")
    return password


class UserCreate(BaseModel):
    """What ``kasou user create`` and ``POST /v1/users`` take."""

    model_config = ConfigDict(extra="forbid")

    name: str
    role: Role
    password: str = Field(repr=False)
    display_name: str = Field("", max_length=200)
    pools: list[str] = []  # desktop pools a clinician is entitled to
    departments: list[str] = []  # a vendor's or manager's departments: the VMs tagged with one of them

    @classmethod
    def parse(cls, data: Any) -> UserCreate:
        spec: UserCreate = parse_model(cls, data)
        validate_name(spec.name, "user")
        if spec.name.lower() in RESERVED_NAMES:
            raise InvalidSpec(f"the user name {spec.name!r} is reserved", field="name")
        check_password(spec.password)
        for p in spec.pools:
            validate_name(p, "pool")
        check_departments(spec.role, spec.departments)
        return spec


def check_departments(role: Role, departments: list[str]) -> None:
    """A vendor or a manager has one department or more; other roles have none."""
    for d in departments:
        validate_name(d, "department")
    if role in SCOPED_ROLES and not departments:
        raise InvalidSpec(f"a {role.value} user needs at least one department (--department)", field="departments")
    if role not in SCOPED_ROLES and departments:
        raise InvalidSpec(f"only a vendor or a manager has departments, not a {role.value}", field="departments")
    if len(set(departments)) != len(departments):
        raise InvalidSpec("a department is given twice", field="departments")
