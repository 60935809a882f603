"""Users, their passwords (argon2id) and their sign-in sessions, kept in the store.

A session is a random token (256 bits) held in an HttpOnly, SameSite=Strict cookie; the store
keeps only its SHA-256, so a copy of the store signs no one in. A session ends after
``KASOU_SESSION_IDLE`` seconds without a request (automatic log-off, 15 minutes by default) and at
the latest ``KASOU_SESSION_MAX`` seconds after sign-in (12 hours). Five wrong passwords in a row
lock the account for five minutes.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import secrets
import time

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from pydantic import BaseModel, Field

from kasou.control import audit
from kasou.errors import AlreadyExists, InvalidSpec, NotFound, StoreConflict, Unauthorized
from kasou.model.names import validate_name
from kasou.model.users import Role, UserCreate, check_departments, check_password
from kasou.store.base import Store

USERS_PREFIX = "users/"
SESSIONS_PREFIX = "sessions/"
LOCK_AFTER = 5
LOCK_S = 300.0
TOUCH_EVERY_S = 20.0  # a session's last use is written at most this often


def _setting(name: str, default: float) -> float:
    try:
        return float(os.environ.get(name, default))
    except ValueError:
        return default


def session_idle_s() -> float:
    return _setting("KASOU_SESSION_IDLE", 900.0)


def session_max_s() -> float:
    return _setting("KASOU_SESSION_MAX", 12 * 3600.0)


_hasher = PasswordHasher()
_DUMMY = _hasher.hash("kasou-dummy-password")  # verified for unknown names: the same time either way


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


class UserView(BaseModel):
    name: str
    role: Role
    display_name: str
    pools: list[str]
    departments: list[str] = []
    created_at: float
    locked: bool


class SessionRecord(BaseModel):
    user: str
    created_at: float
    last_used: float
    source: str = ""


def _sid(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def view(u: UserRecord) -> UserView:
    locked = u.locked_until is not None and u.locked_until > time.time()
    return UserView(name=u.name, role=u.role, display_name=u.display_name, pools=u.pools,
                    departments=u.departments, created_at=u.created_at, locked=locked)  # fmt: skip


class Users:
    def __init__(self, store: Store) -> None:
        self.store = store

    async def get(self, name: str) -> UserRecord:
        validate_name(name, "user")
        e = await self.store.get(USERS_PREFIX + name)
        if e is None:
            raise NotFound(f"no user named {name!r}")
        return UserRecord.model_validate(e.value)

    async def list_all(self) -> list[UserView]:
        return [view(UserRecord.model_validate(e.value)) for e in await self.store.range(USERS_PREFIX)]

    async def create(self, spec: UserCreate) -> UserView:
        digest = await asyncio.to_thread(_hasher.hash, spec.password)
        rec = UserRecord(name=spec.name, role=spec.role, display_name=spec.display_name, password_hash=digest,
                         pools=spec.pools, departments=spec.departments)  # fmt: skip
        try:
            await self.store.create(USERS_PREFIX + spec.name, rec.model_dump(mode="json"))
        except StoreConflict:
            raise AlreadyExists(f"a user named {spec.name!r} already exists") from None
        return view(rec)

    async def delete(self, name: str) -> None:
        await self.get(name)
        await self.store.delete(USERS_PREFIX + name)
        for e in await self.store.range(SESSIONS_PREFIX):
            if e.value.get("user") == name:
                await self.store.delete(e.key)

    async def set_password(self, name: str, password: str) -> None:
        check_password(password)
        rec = await self.get(name)
        digest = await asyncio.to_thread(_hasher.hash, password)
        rec = rec.model_copy(update={"password_hash": digest, "failures": 0, "locked_until": None})
        await self.store.put(USERS_PREFIX + name, rec.model_dump(mode="json"))

    async def set_pools(self, name: str, pools: list[str]) -> UserView:
        for p in pools:
            validate_name(p, "pool")
        rec = (await self.get(name)).model_copy(update={"pools": pools})
        await self.store.put(USERS_PREFIX + name, rec.model_dump(mode="json"))
        return view(rec)

    async def set_departments(self, name: str, departments: list[str]) -> UserView:
        rec = await self.get(name)
        check_departments(rec.role, departments)
        rec = rec.model_copy(update={"departments": departments})
        await self.store.put(USERS_PREFIX + name, rec.model_dump(mode="json"))
        return view(rec)

    # -- sign-in --------------------------------------------------------------------------

    async def login(self, name: str, password: str, source: str = "") -> tuple[str, UserRecord]:
        """Check the password; a new session token and the user. Wrong name or password: one message."""
        wrong = Unauthorized("wrong user name or password")
        if not isinstance(name, str) or not isinstance(password, str) or len(password) > 1024:
            raise wrong
        try:
            rec = await self.get(name)
        except (NotFound, InvalidSpec):
            with contextlib.suppress(VerificationError, InvalidHashError):
                await asyncio.to_thread(_hasher.verify, _DUMMY, password)
            raise wrong from None
        now = time.time()
        if rec.locked_until is not None and rec.locked_until > now:
            raise Unauthorized(f"user {name!r} is locked after {LOCK_AFTER} wrong passwords; "
                               f"try again in {rec.locked_until - now:.0f} s")  # fmt: skip
        try:
            await asyncio.to_thread(_hasher.verify, rec.password_hash, password)
        except (VerificationError, InvalidHashError):
            failures = rec.failures + 1
            locked = now + LOCK_S if failures >= LOCK_AFTER else None
            await self.store.put(USERS_PREFIX + name, rec.model_copy(update={
                "failures": 0 if locked else failures, "locked_until": locked}).model_dump(mode="json"))  # fmt: skip
            if locked:
                await audit.record(self.store, "lockout", source=source, target=f"users/{name}", details={
                    "failures": failures, "locked_s": LOCK_S})  # fmt: skip
            raise wrong from None
        if rec.failures or rec.locked_until:
            rec = rec.model_copy(update={"failures": 0, "locked_until": None})
            await self.store.put(USERS_PREFIX + name, rec.model_dump(mode="json"))
        token = secrets.token_urlsafe(32)
        sess = SessionRecord(user=name, created_at=now, last_used=now, source=source[:100])
        await self.store.put(SESSIONS_PREFIX + _sid(token), sess.model_dump(mode="json"))
        return token, rec

    async def session_user(self, token: str) -> UserRecord:
        """The user of a live session (and the session's last use noted); Unauthorized if it ended."""
        key = SESSIONS_PREFIX + _sid(token)
        e = await self.store.get(key)
        if e is None:
            raise Unauthorized("not signed in (or the session ended): sign in again")
        sess = SessionRecord.model_validate(e.value)
        now = time.time()
        if now - sess.last_used > session_idle_s() or now - sess.created_at > session_max_s():
            await self.store.delete(key)
            raise Unauthorized("the session ended after a time without use: sign in again")
        if now - sess.last_used > TOUCH_EVERY_S:
            await self.store.put(key, sess.model_copy(update={"last_used": now}).model_dump(mode="json"))
        try:
            return await self.get(sess.user)
        except NotFound:
            await self.store.delete(key)
            raise Unauthorized("this user no longer exists") from None

    async def session_of(self, token: str) -> SessionRecord | None:
        e = await self.store.get(SESSIONS_PREFIX + _sid(token))
        return SessionRecord.model_validate(e.value) if e is not None else None

    async def logout(self, token: str) -> SessionRecord | None:
        key = SESSIONS_PREFIX + _sid(token)
        e = await self.store.get(key)
        await self.store.delete(key)
        return SessionRecord.model_validate(e.value) if e is not None else None

    async def expired_sessions(self) -> list[tuple[str, SessionRecord]]:
        """Sessions past their idle time or maximum age (for the portal to return their desktops)."""
        now = time.time()
        out = []
        for e in await self.store.range(SESSIONS_PREFIX):
            s = SessionRecord.model_validate(e.value)
            if now - s.last_used > session_idle_s() or now - s.created_at > session_max_s():
                out.append((e.key.removeprefix(SESSIONS_PREFIX), s))
        return out

    async def drop_session(self, sid: str) -> None:
        await self.store.delete(SESSIONS_PREFIX + sid)

    async def live_sessions(self, user: str) -> list[str]:
        """The session ids of a user that have not ended."""
        now = time.time()
        out = []
        for e in await self.store.range(SESSIONS_PREFIX):
            s = SessionRecord.model_validate(e.value)
            if s.user == user and now - s.last_used <= session_idle_s() and now - s.created_at <= session_max_s():
                out.append(e.key.removeprefix(SESSIONS_PREFIX))
        return out
