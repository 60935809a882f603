"""``/v1/auth`` (sign in and out, the break-glass account) and ``/v1/users`` (administrators manage users,
their API tokens and their TOTP second factor)."""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Body, Depends, Request, Response
from pydantic import BaseModel, ConfigDict, Field

from kasou.api.audit import client_source
from kasou.api.auth import SESSION_COOKIE, Principal
from kasou.api.limits import SignInLimiter
from kasou.config import session_max_s
from kasou.control.breakglass import Rotated
from kasou.control.tokens import EXPIRES_MAX_DAYS, LABEL_MAX, TokenCreated, TokenView
from kasou.control.users import TotpEnrolment, UserView
from kasou.errors import Forbidden, NotFound, Unauthorized
from kasou.model.users import Role, UserCreate

if TYPE_CHECKING:
    from kasou.api.deps import Services


class Login(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(max_length=100)
    password: str = Field(max_length=1024, repr=False)
    totp: str | None = Field(default=None, max_length=16, repr=False)  # the code, for a user with TOTP on


class Me(BaseModel):
    name: str
    role: Role
    via: str
    pools: list[str]
    departments: list[str] = []
    permissions: list[str]
    totp: bool | None = None  # the user has the TOTP second factor on (None: no user kept in the store)
    source: str = "local"  # local, or directory (the hospital's directory signed the user in)
    groups: list[str] = []  # a directory user: the mapped groups that gave the role


class PasswordChange(BaseModel):
    model_config = ConfigDict(extra="forbid")

    password: str = Field(max_length=1024, repr=False)


class OwnPasswordChange(BaseModel):
    model_config = ConfigDict(extra="forbid")

    current_password: str = Field(max_length=1024, repr=False)
    password: str = Field(max_length=1024, repr=False)


class PasswordChanged(BaseModel):
    ok: bool
    sessions_ended: int  # the user's other sessions, now signed out


class SignedOut(BaseModel):
    ok: bool
    sessions_ended: int  # the user's sessions, now ended


class Reauth(BaseModel):
    model_config = ConfigDict(extra="forbid")

    password: str = Field(max_length=1024, repr=False)  # the user's current password


class PoolsChange(BaseModel):
    model_config = ConfigDict(extra="forbid")

    pools: list[str]


class DepartmentsChange(BaseModel):
    model_config = ConfigDict(extra="forbid")

    departments: list[str]


class TokenCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    label: str = Field("", max_length=LABEL_MAX)
    expires_days: int | None = Field(None, ge=1, le=EXPIRES_MAX_DAYS)  # None: it does not expire


class TotpConfirm(BaseModel):
    model_config = ConfigDict(extra="forbid")

    totp: str = Field(max_length=16, repr=False)  # a code from the enrolled device


class Acknowledged(BaseModel):
    acknowledged: int  # break-glass uses whose events ended


def _me(p: Principal) -> Me:
    from kasou.model.users import PERMISSIONS

    return Me(name=p.name, role=p.role, via=p.via, pools=list(p.pools), departments=list(p.departments),
              permissions=sorted(PERMISSIONS[p.role]))  # fmt: skip


def user_routes(svc: Callable[[], Services], principal: Callable[[Request], Awaitable[Principal]]) -> APIRouter:
    r = APIRouter(prefix="/v1")

    async def admin(request: Request) -> Principal:
        p = await principal(request)
        p.require("users")
        return p

    limiter = SignInLimiter()  # failed sign-ins per source address (kasou.api.limits)
    too_many = {"description": "Too many failed sign-ins from this address: wait Retry-After seconds",
                "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}  # fmt: skip

    @r.post("/auth/login", responses={429: too_many})
    async def login(body: Login, request: Request, response: Response) -> Me:
        """Sign in with a user name and password: sets the session cookie (HttpOnly, SameSite=Strict). Failed
        sign-ins from one address are bounded (``KASOU_SIGNIN_RATE`` a minute): past it, 429 and Retry-After."""
        source = client_source(request)
        limiter.take(source)  # counted as failed until it succeeds: attempts sent at once cannot slip past
        try:
            token, user = await svc().users.login(body.name, body.password, source, body.totp)
        except Unauthorized as e:
            if not body.totp and e.details.get("totp") in ("required", "enroll"):
                limiter.give_back(source)  # the right password, asked for its code (the web UI's first step)
            raise  # any other refused sign-in stays counted
        except BaseException:
            limiter.give_back(source)  # not a refused sign-in (the store failed...): not held against the address
            raise
        limiter.give_back(source)
        response.set_cookie(
            SESSION_COOKIE, token, httponly=True, samesite="strict", secure=request.url.scheme == "https",
            max_age=int(session_max_s()), path="/",
        )  # fmt: skip
        p = Principal(name=user.name, role=user.role, via="break_glass" if user.break_glass else "session",
                      session=token, pools=tuple(user.pools), departments=tuple(user.departments))  # fmt: skip
        out = _me(p)
        out.source, out.groups = user.source, list(user.dir_groups)
        return out

    @r.post("/auth/logout")
    async def logout(request: Request, response: Response) -> dict[str, bool]:
        """Sign out: the session ends (a clinician's desktop goes back to its pool)."""
        p = await principal(request)
        if p.session is None:
            raise Unauthorized("signed in with an API token: there is no session to end")
        for hook in svc().logout_hooks:
            await hook(p.name, p.session)
        await svc().users.logout(p.session)
        response.delete_cookie(SESSION_COOKIE, path="/")
        return {"ok": True}

    @r.get("/auth/me")
    async def me(request: Request) -> Me:
        p = await principal(request)
        out = _me(p)
        if not p.is_root and p.via != "break_glass":
            with contextlib.suppress(NotFound):
                rec = await svc().users.get(p.name)
                out.totp, out.source, out.groups = rec.totp_secret is not None, rec.source, list(rec.dir_groups)
        return out

    async def a_user(request: Request) -> Principal:
        """The signed-in user acting on their own credentials (not the root token nor the break-glass account)."""
        p = await principal(request)
        if p.is_root or p.via == "break_glass":
            raise Forbidden(f"{p.name!r} is not a user kept in the store: it has no password or second factor "
                            "to change here")  # fmt: skip
        return p

    @r.post("/auth/me/password")
    async def change_own_password(body: OwnPasswordChange, request: Request) -> PasswordChanged:
        """Change one's own password (the current one first); the user's other sessions end."""
        p = await a_user(request)
        source = client_source(request)
        ended = await svc().users.change_own_password(p.name, body.current_password, body.password, p.session,
                                                      source)  # fmt: skip
        return PasswordChanged(ok=True, sessions_ended=ended)

    @r.post("/auth/me/totp")
    async def totp_enroll_own(body: Reauth, request: Request) -> TotpEnrolment:
        """Set up one's own TOTP second factor (the password first): the secret and URI, shown this once."""
        p = await a_user(request)
        source = client_source(request)
        return await svc().users.totp_enroll_own(p.name, body.password, source)

    @r.post("/auth/me/totp/confirm")
    async def totp_confirm_own(body: TotpConfirm, request: Request) -> UserView:
        """Turn one's own TOTP on with a code from the device just set up."""
        p = await a_user(request)
        return await svc().users.totp_confirm(p.name, body.totp)

    @r.get("/users", dependencies=[Depends(admin)])
    async def list_users() -> list[UserView]:
        return await svc().users.list_all()

    @r.post("/users", status_code=201, dependencies=[Depends(admin)])
    async def create_user(body: dict[str, Any] = Body(...)) -> UserView:
        return await svc().users.create(UserCreate.parse(body))

    @r.delete("/users/{user}", status_code=204, dependencies=[Depends(admin)])
    async def delete_user(user: str) -> None:
        await svc().users.delete(user)

    @r.post("/users/{user}/password", dependencies=[Depends(admin)])
    async def set_password(user: str, body: PasswordChange) -> PasswordChanged:
        """Set a user's password: the account is unlocked and every session of the user ends."""
        ended = await svc().users.set_password(user, body.password)
        return PasswordChanged(ok=True, sessions_ended=ended)

    @r.post("/users/{user}/signout", dependencies=[Depends(admin)])
    async def signout(user: str) -> SignedOut:
        """End every session of a user (a stolen session, a user who left); their API tokens are not touched."""
        return SignedOut(ok=True, sessions_ended=await svc().users.signout(user))

    @r.put("/users/{user}/pools", dependencies=[Depends(admin)])
    async def set_pools(user: str, body: PoolsChange) -> UserView:
        """The desktop pools a clinician is entitled to."""
        return await svc().users.set_pools(user, body.pools)

    @r.put("/users/{user}/departments", dependencies=[Depends(admin)])
    async def set_departments(user: str, body: DepartmentsChange) -> UserView:
        """A vendor's departments: the VMs tagged with one of them are the vendor's to manage."""
        return await svc().users.set_departments(user, body.departments)

    # -- API tokens for scripts (the token is shown once; the store keeps its SHA-256) ---------

    @r.post("/users/{user}/tokens", status_code=201, dependencies=[Depends(admin)])
    async def create_token(user: str, body: TokenCreate) -> TokenCreated:
        """A new API token acting as ``user`` (with the user's role and departments); shown this once."""
        return await svc().users.create_token(user, body.label, body.expires_days)

    @r.get("/users/{user}/tokens", dependencies=[Depends(admin)])
    async def list_tokens(user: str) -> list[TokenView]:
        return await svc().users.list_tokens(user)

    @r.delete("/users/{user}/tokens/{token_id}", status_code=204, dependencies=[Depends(admin)])
    async def revoke_token(user: str, token_id: str) -> None:
        await svc().users.revoke_token(user, token_id)

    # -- TOTP second factor ---------------------------------------------------------------------

    @r.post("/users/{user}/totp", dependencies=[Depends(admin)])
    async def totp_enroll(user: str) -> TotpEnrolment:
        """A new TOTP secret and its otpauth:// URI, shown this once; confirm it with a code to turn it on."""
        return await svc().users.totp_enroll(user)

    @r.post("/users/{user}/totp/confirm", dependencies=[Depends(admin)])
    async def totp_confirm(user: str, body: TotpConfirm) -> UserView:
        """Turn TOTP on: from now on ``/v1/auth/login`` needs a code (``totp``) for this user."""
        return await svc().users.totp_confirm(user, body.totp)

    @r.delete("/users/{user}/totp", dependencies=[Depends(admin)])
    async def totp_disable(user: str) -> UserView:
        """Turn TOTP off (a lost device); enroll again for a new one."""
        return await svc().users.totp_disable(user)

    # -- the break-glass (emergency) account ------------------------------------------------------

    @r.post("/users/break-glass")
    async def break_glass_rotate(request: Request) -> Rotated:
        """Make or replace the break-glass password (shown this once): the root API token only."""
        p = await admin(request)
        if not p.is_root:
            raise Forbidden("only the root API token (root on a host: kasou user break-glass) sets the "
                            "break-glass password")  # fmt: skip
        return await svc().users.break_glass.rotate()

    @r.post("/users/break-glass/acknowledge")
    async def break_glass_acknowledge(request: Request) -> Acknowledged:
        """An administrator has looked into the break-glass uses: their operator events end."""
        p = await admin(request)
        if p.via == "break_glass":
            raise Forbidden("the break-glass account cannot acknowledge its own use: another administrator does")
        return Acknowledged(acknowledged=await svc().users.acknowledge_break_glass(p.name))

    return r
