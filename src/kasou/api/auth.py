"""Who a request acts for: the API (root) token, made at first start and readable by root only, a user's own
API token (``ksu_...``, :mod:`kasou.control.tokens`), or a user's session (the break-glass account's included)."""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from kasou.errors import Forbidden, Unauthorized
from kasou.model.users import PERMISSIONS, SCOPED_ROLES, Role

if TYPE_CHECKING:
    from kasou.control.users import Users


def ensure_token(path: Path) -> str:
    """Read the token, creating it (mode 0600) if there is none yet."""
    try:
        token = path.read_text().strip()
        if token:
            return token
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    token = secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    os.chmod(path, 0o600)
    return token


def read_token(path: Path) -> str:
    """The token for a client: ``KASOU_TOKEN`` or the token file."""
    env = os.environ.get("KASOU_TOKEN")
    if env:
        return env.strip()
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        raise Unauthorized(f"no API token at {path}; start kasou with: kasou up") from None
    except PermissionError:
        raise Unauthorized(f"cannot read the API token at {path}: run as root or set KASOU_TOKEN") from None


def check_bearer(header: str | None, token: str) -> None:
    if not header or not header.startswith("Bearer "):
        raise Unauthorized("an API token is required (Authorization: Bearer ...)")
    if not secrets.compare_digest(header[len("Bearer ") :].strip().encode(), token.encode()):
        raise Unauthorized("the API token is not valid")


# -- who is asking: the root token, or a signed-in user's session -----------------------------

SESSION_COOKIE = "kasou_session"
CSRF_HEADER = "x-kasou-csrf"  # a cookie-signed request that changes something must carry it (the web UI does)


@dataclass(frozen=True)
class Principal:
    """The one a request acts for."""

    name: str
    role: Role
    via: Literal["token", "session", "break_glass"]  # break_glass: a session of the emergency account
    session: str | None = None  # the session token (to sign out)
    pools: tuple[str, ...] = ()  # desktop pools a clinician is entitled to
    departments: tuple[str, ...] = ()  # a vendor's departments
    token_id: str | None = None  # a user's API token: its public id

    @property
    def is_root(self) -> bool:
        """The root API token (readable by root on a host only)."""
        return self.via == "token" and self.token_id is None and self.name == "root"

    @property
    def scoped(self) -> bool:
        """True if the VM permissions hold only for VMs of the principal's departments."""
        return self.role in SCOPED_ROLES

    def can(self, permission: str) -> bool:
        return permission in PERMISSIONS[self.role]

    def sees(self, department: str | None) -> bool:
        """May this principal's VM permissions act on a VM of ``department``?"""
        return not self.scoped or (department is not None and department in self.departments)

    def require(self, permission: str) -> None:
        if not self.can(permission):
            raise Forbidden(f"user {self.name!r} ({self.role.value}) may not do this (needs {permission!r})")


async def resolve_principal(
    authorization: str | None,
    cookie: str | None,
    csrf: str | None,
    method: str,
    token: str,
    users: Callable[[], Users],
) -> Principal:
    """The principal of a request: the root token (an administrator), a user's API token (that user, no CSRF
    header: it is not a cookie), else a session cookie."""
    if authorization:
        return await bearer_principal(authorization, token, users)
    if not cookie:
        raise Unauthorized("an API token is required (Authorization: Bearer ...), or sign in")
    user = await users().session_user(cookie)
    if method not in ("GET", "HEAD", "OPTIONS") and csrf != "1":
        raise Forbidden(f"a signed-in request that changes something must carry the header {CSRF_HEADER}: 1")
    return Principal(name=user.name, role=user.role, via="break_glass" if user.break_glass else "session",
                     session=cookie, pools=tuple(user.pools), departments=tuple(user.departments))  # fmt: skip


async def bearer_principal(authorization: str, token: str, users: Callable[[], Users]) -> Principal:
    """The root token, or a user's own API token (while its user exists and is not locked)."""
    from kasou.control.tokens import looks_like_user_token

    if not authorization.startswith("Bearer "):
        raise Unauthorized("an API token is required (Authorization: Bearer ...)")
    presented = authorization[len("Bearer ") :].strip()
    if secrets.compare_digest(presented.encode(), token.encode()):
        return Principal(name="root", role=Role.ADMIN, via="token")
    if not looks_like_user_token(presented):
        raise Unauthorized("the API token is not valid")
    user, t = await users().token_user(presented)
    return Principal(name=user.name, role=user.role, via="token", pools=tuple(user.pools),
                     departments=tuple(user.departments), token_id=t.id)  # fmt: skip
