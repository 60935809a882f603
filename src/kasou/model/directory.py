"""Directory sign-in (LDAP / Active Directory): the settings kasou keeps and how groups give a role.

An administrator points kasou at the hospital's directory (``kasou directory set``) and maps directory
groups to a kasou role, departments and desktop pools (``kasou directory map``). A directory user signs in
with their directory password; their role comes from the groups they are in (nested groups included):
of several mapped groups the most powerful role wins, and departments and pools are united. A user in no
mapped group gets no kasou role and is refused.

Only LDAPS (``ldaps://``) or StartTLS (``ldap://`` with ``starttls``) with certificate verification is
allowed: a simple bind over plain text would send every password readable on the wire.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field

from kasou.errors import InvalidSpec
from kasou.model.names import validate_name
from kasou.model.parsing import parse_model
from kasou.model.users import SCOPED_ROLES, Role, check_departments

#: Active Directory's user filter; ``{name}`` is the sign-in name, escaped before it is put in.
AD_USER_FILTER = "(&(objectClass=user)(sAMAccountName={name}))"
URLS_MAX = 4
TIMEOUT_DEFAULT_S = 5.0
#: From the most powerful role down: of several mapped groups, the first role in this order wins.
ROLE_ORDER: tuple[Role, ...] = (Role.ADMIN, Role.OPERATOR, Role.AUDITOR, Role.MANAGER, Role.VENDOR, Role.CLINICIAN)


def role_rank(role: Role) -> int:
    """Lower is more powerful; a role this list does not know (a newer one) ranks after all of them."""
    return ROLE_ORDER.index(role) if role in ROLE_ORDER else len(ROLE_ORDER)


def check_url(url: str, starttls: bool) -> str:
    """An LDAP URL kasou may use: ``ldaps://HOST[:PORT]``, or ``ldap://HOST[:PORT]`` with StartTLS."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise InvalidSpec(f"{url!r} is no LDAP URL (e.g. ldaps://dc1.hospital.local)", field="urls") from None
    if parts.scheme not in ("ldap", "ldaps") or not parts.hostname or parts.path not in ("", "/"):
        raise InvalidSpec(f"{url!r} is no LDAP URL (e.g. ldaps://dc1.hospital.local)", field="urls")
    if parts.scheme == "ldap" and not starttls:
        raise InvalidSpec(f"{url!r} would send passwords in plain text: use ldaps://{parts.netloc} or add "
                          "--starttls", field="urls")  # fmt: skip
    if parts.scheme == "ldaps" and starttls:
        raise InvalidSpec(f"{url!r} is LDAPS already: StartTLS is for ldap:// URLs", field="urls")
    if port is not None and not 1 <= port <= 65535:
        raise InvalidSpec(f"{url!r}: the port must be from 1 to 65535", field="urls")
    return url.rstrip("/")


def check_filter(text: str) -> str:
    if "{name}" not in text or not text.startswith("(") or not text.endswith(")") or len(text) > 1000:
        raise InvalidSpec("the user filter is an LDAP filter in parentheses holding {name}, e.g. "
                          + AD_USER_FILTER, field="user_filter")  # fmt: skip
    if text.count("(") != text.count(")"):
        raise InvalidSpec(f"the user filter {text!r} has unbalanced parentheses", field="user_filter")
    return text


class DirectorySet(BaseModel):
    """What ``kasou directory set`` and ``PUT /v1/directory`` take."""

    model_config = ConfigDict(extra="forbid")

    urls: list[str]  # tried in order: the first that answers
    base_dn: str = Field(max_length=500)
    bind_user: str = Field(max_length=500)  # the service account's DN (or user@domain on AD)
    bind_password: str = Field(max_length=1024, repr=False)
    ca_pem: str | None = Field(default=None, max_length=200_000)  # the CA to trust; None: the system's
    user_filter: str = AD_USER_FILTER
    starttls: bool = False
    timeout_s: float = Field(default=TIMEOUT_DEFAULT_S, ge=1, le=30)

    @classmethod
    def parse(cls, data: Any) -> DirectorySet:
        spec: DirectorySet = parse_model(cls, data)
        if not 1 <= len(spec.urls) <= URLS_MAX:
            raise InvalidSpec(f"give 1 to {URLS_MAX} directory URLs (--url)", field="urls")
        urls = [check_url(u, spec.starttls) for u in spec.urls]
        if not spec.base_dn.strip() or "=" not in spec.base_dn:
            raise InvalidSpec("the base DN is like DC=hospital,DC=local", field="base_dn")
        if not spec.bind_user.strip():
            raise InvalidSpec("the service account (--bind-user) is missing", field="bind_user")
        if not spec.bind_password:
            raise InvalidSpec("the service account's password is empty", field="bind_password")
        if spec.ca_pem is not None and "-----BEGIN CERTIFICATE-----" not in spec.ca_pem:
            raise InvalidSpec("the CA file holds no PEM certificate", field="ca_pem")
        return spec.model_copy(update={"urls": urls, "user_filter": check_filter(spec.user_filter)})


class GroupMapping(BaseModel):
    """What one directory group gives its members."""

    model_config = ConfigDict(extra="forbid")

    role: Role
    departments: list[str] = []
    pools: list[str] = []

    @classmethod
    def parse(cls, data: Any) -> GroupMapping:
        m: GroupMapping = parse_model(cls, data)
        check_departments(m.role, m.departments)
        for p in m.pools:
            validate_name(p, "pool")
        return m


def group_key(group: str) -> str:
    """How a mapped group is kept and matched: its name (CN) or its whole DN, without case."""
    g = " ".join(group.split())
    if not g or len(g) > 500:
        raise InvalidSpec("a group is its name (CN) or its DN, up to 500 characters", field="group")
    return g.lower()


class DirectoryConfig(BaseModel):
    """What the store keeps (``directory/config``): the bind password sealed, never shown back."""

    urls: list[str]
    base_dn: str
    bind_user: str
    bind_password: str = Field(repr=False)  # sealed (kasou.control.sealed)
    ca_pem: str | None = None
    user_filter: str = AD_USER_FILTER
    starttls: bool = False
    timeout_s: float = TIMEOUT_DEFAULT_S
    mappings: dict[str, GroupMapping] = {}  # group_key(group) -> what it gives


class DirectoryView(BaseModel):
    """``kasou directory show``: the settings without the password."""

    enabled: bool
    urls: list[str] = []
    base_dn: str = ""
    bind_user: str = ""
    ca: str = ""  # "the system's" or "given (N certificates)"
    user_filter: str = ""
    starttls: bool = False
    timeout_s: float = TIMEOUT_DEFAULT_S
    mappings: dict[str, GroupMapping] = {}
    status: str = "off"  # ok, unreachable, off


class Group(BaseModel):
    dn: str
    name: str  # its CN


class Grant(BaseModel):
    """What a directory user gets: the role, departments and pools, and the mapped groups that gave them."""

    role: Role | None  # None: no mapped group
    departments: list[str] = []
    pools: list[str] = []
    groups: list[str] = []  # the mapped groups (as mapped) that gave the role

    def same(self, role: Role, departments: list[str], pools: list[str]) -> bool:
        return self.role == role and sorted(self.departments) == sorted(departments) and sorted(
            self.pools) == sorted(pools)  # fmt: skip


def resolve(groups: list[Group], mappings: dict[str, GroupMapping]) -> Grant:
    """The grant of a user in ``groups``: the most powerful mapped role; the departments of the groups that
    give that role (a scoped role's), and the pools of every mapped group."""
    found: list[tuple[str, GroupMapping]] = []
    for g in groups:
        for key in dict.fromkeys((g.dn.lower(), g.name.lower())):
            if key in mappings:
                found.append((key, mappings[key]))
    if not found:
        return Grant(role=None)
    role = min((m.role for _, m in found), key=role_rank)
    departments: list[str] = []
    pools: list[str] = []
    for _, m in found:
        if m.role == role and role in SCOPED_ROLES:
            departments += [d for d in m.departments if d not in departments]
        pools += [p for p in m.pools if p not in pools]
    gave = sorted({k for k, m in found if m.role == role})
    return Grant(role=role, departments=departments, pools=pools, groups=gave)


class DirectoryTest(BaseModel):
    """``POST /v1/directory/test``: look a user up (and with a password, try the bind)."""

    model_config = ConfigDict(extra="forbid")

    user: str = Field(max_length=256)
    password: str | None = Field(default=None, max_length=1024, repr=False)


class DirectoryTestResult(BaseModel):
    user: str
    found: bool
    dn: str = ""
    display_name: str = ""
    disabled: bool = False
    groups: list[Group] = []
    grant: Grant = Grant(role=None)
    bind: str = "not tried"  # not tried, ok, or why it was refused
    url: str = ""  # the server that answered
    elapsed_ms: float = 0.0
