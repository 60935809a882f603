"""The records of users and sessions kept in the store (:mod:`kasou.control.users` works with them)."""

from __future__ import annotations

import hashlib
import time

from pydantic import BaseModel, Field

from kasou.model.users import Role

USERS_PREFIX = "users/"
SESSIONS_PREFIX = "sessions/"


class UserRecord(BaseModel):
    name: str
    role: Role
    display_name: str = ""
    password_hash: str = Field(repr=False)
    pools: list[str] = []  # desktop pools a clinician is entitled to
    departments: list[str] = []  # a vendor's departments
    created_at: float = Field(default_factory=time.time)
    failures: int = 0
    locked_until: float | None = None
    # The second factor, once confirmed, and one enrolled but not confirmed yet: sealed with the site's
    # secrets key (kasou.control.sealed); a record written before sealing holds them plain.
    totp_secret: str | None = Field(default=None, repr=False)
    totp_pending: str | None = Field(default=None, repr=False)
    totp_last_step: int = 0  # the last TOTP step a code was accepted for (no replay)
    break_glass: bool = False  # the break-glass account (never stored as a user)
    # A directory user (kasou.control.directory): no password of kasou's (the hash is empty and matches no
    # password); role, departments and pools come from the directory's groups at sign-in and re-checks.
    source: str = "local"  # local, directory
    dir_dn: str = ""  # the user's DN in the directory
    dir_groups: list[str] = []  # the mapped groups that gave the role
    dir_checked: float = 0.0  # when the directory last confirmed the user (UNIX time)
    dir_refused: str | None = None  # why the last re-check refused the user (sessions ended, tokens refused)


class TotpEnrolment(BaseModel):
    secret: str = Field(repr=False)  # base32, shown this once
    uri: str = Field(repr=False)  # otpauth://totp/kasou:NAME?secret=...


class UserView(BaseModel):
    name: str
    role: Role
    display_name: str
    pools: list[str]
    departments: list[str] = []
    created_at: float
    locked: bool
    totp: bool = False  # signs in with a TOTP code
    source: str = "local"  # local, or directory (role, departments and pools come from its groups)


class SessionRecord(BaseModel):
    user: str
    created_at: float
    last_used: float
    source: str = ""
    break_glass: str | None = None  # a break-glass session: the id of the password it signed in with


def sid(token: str) -> str:
    """A session's key in the store: the SHA-256 of its token."""
    return hashlib.sha256(token.encode()).hexdigest()


def view(u: UserRecord) -> UserView:
    locked = u.locked_until is not None and u.locked_until > time.time()
    return UserView(name=u.name, role=u.role, display_name=u.display_name, pools=u.pools,
                    departments=u.departments, created_at=u.created_at, locked=locked,
                    totp=u.totp_secret is not None, source=u.source)  # fmt: skip
