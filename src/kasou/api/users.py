"""``/v1/auth`` (sign in and out) and ``/v1/users`` (administrators manage users)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Body, Depends, Request, Response
from pydantic import BaseModel, ConfigDict, Field

from kasou.api.auth import SESSION_COOKIE, Principal
from kasou.control.users import UserView, session_max_s
from kasou.errors import Unauthorized
from kasou.model.users import Role, UserCreate

if TYPE_CHECKING:
    from kasou.api.app import Services


class Login(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(max_length=100)
    password: str = Field(max_length=1024, repr=False)


class Me(BaseModel):
    name: str
    role: Role
    via: str
    pools: list[str]
    departments: list[str] = []
    permissions: list[str]


class PasswordChange(BaseModel):
    model_config = ConfigDict(extra="forbid")

    password: str = Field(max_length=1024, repr=False)


class PoolsChange(BaseModel):
    model_config = ConfigDict(extra="forbid")

    pools: list[str]


class DepartmentsChange(BaseModel):
    model_config = ConfigDict(extra="forbid")

    departments: list[str]


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

    @r.post("/auth/login")
    async def login(body: Login, request: Request, response: Response) -> Me:
        """Sign in with a user name and password: sets the session cookie (HttpOnly, SameSite=Strict)."""
        source = request.client.host if request.client else ""
        token, user = await svc().users.login(body.name, body.password, source)
        response.set_cookie(
            SESSION_COOKIE, token, httponly=True, samesite="strict", secure=request.url.scheme == "https",
            max_age=int(session_max_s()), path="/",
        )  # fmt: skip
        p = Principal(name=user.name, role=user.role, via="session", session=token, pools=tuple(user.pools),
                      departments=tuple(user.departments))  # fmt: skip
        return _me(p)

    @r.post("/auth/logout")
    async def logout(request: Request, response: Response) -> dict[str, bool]:
        """Sign out: the session ends (a clinician's desktop goes back to its pool)."""
        p = await principal(request)
        if p.session is None:
            raise Unauthorized("signed in with the API token: there is no session to end")
        for hook in svc().logout_hooks:
            await hook(p.name, p.session)
        await svc().users.logout(p.session)
        response.delete_cookie(SESSION_COOKIE, path="/")
        return {"ok": True}

    @r.get("/auth/me")
    async def me(request: Request) -> Me:
        return _me(await principal(request))

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
    async def set_password(user: str, body: PasswordChange) -> dict[str, bool]:
        await svc().users.set_password(user, body.password)
        return {"ok": True}

    @r.put("/users/{user}/pools", dependencies=[Depends(admin)])
    async def set_pools(user: str, body: PoolsChange) -> UserView:
        """The desktop pools a clinician is entitled to."""
        return await svc().users.set_pools(user, body.pools)

    @r.put("/users/{user}/departments", dependencies=[Depends(admin)])
    async def set_departments(user: str, body: DepartmentsChange) -> UserView:
        """A vendor's departments: the VMs tagged with one of them are the vendor's to manage."""
        return await svc().users.set_departments(user, body.departments)

    return r
