"""Users and roles: who may sign in to kasou, and what each role may do.

Roles (issue 7 adds department scoping and the auditor's reports):

* ``admin``: everything, users included;
* ``operator``: run, migrate and maintain VMs and hosts, open any console; no user management;
* ``auditor``: read everything (the audit log and the reports included), change nothing, no console;
* ``clinician``: the desktop portal only (a desktop of the pools they are entitled to, its console).

The API's root token (``$KASOU_HOME/api.token``) acts as an administrator for scripts on the host.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from kasou.errors import InvalidSpec
from kasou.model.names import validate_name

PASSWORD_MIN = 10
PASSWORD_MAX = 1024


class Role(StrEnum):
    ADMIN = "admin"
    OPERATOR = "operator"
    AUDITOR = "auditor"
    CLINICIAN = "clinician"


#: What each role may do, by permission name. Routes name the permission they need.
PERMISSIONS: dict[Role, frozenset[str]] = {
    Role.ADMIN: frozenset({"read", "operate", "console", "users", "portal", "audit"}),
    Role.OPERATOR: frozenset({"read", "operate", "console", "portal"}),
    Role.AUDITOR: frozenset({"read", "audit"}),  # "audit": read the audit log (kasou.api.audit)
    Role.CLINICIAN: frozenset({"portal"}),
}


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

    @classmethod
    def parse(cls, data: Any) -> UserCreate:
        from kasou.model.spec import _parse

        spec: UserCreate = _parse(cls, data)
        validate_name(spec.name, "user")
        check_password(spec.password)
        for p in spec.pools:
            validate_name(p, "pool")
        return spec
