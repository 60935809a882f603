"""``/v1/directory``: administrators point kasou at the hospital's directory (LDAP / Active Directory), map its
groups to roles and test a user; ``/v1/directory/status`` tells the sign-in page, signed in or not, whether
directory sign-in works now (``ok``, ``unreachable`` or ``off``, nothing else)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Literal

from fastapi import APIRouter, Body, Depends, Request
from pydantic import BaseModel

from kasou.api.auth import Principal
from kasou.model.directory import DirectorySet, DirectoryTest, DirectoryTestResult, DirectoryView, GroupMapping

if TYPE_CHECKING:
    from kasou.api.deps import Services


class DirectoryStatus(BaseModel):
    directory: Literal["ok", "unreachable", "off"]


class DirectoryOff(BaseModel):
    ok: bool
    was_on: bool


def directory_routes(svc: Callable[[], Services], principal: Callable[[Request], Awaitable[Principal]]) -> APIRouter:
    r = APIRouter(prefix="/v1/directory")

    async def admin(request: Request) -> Principal:
        p = await principal(request)
        p.require("users")
        return p

    @r.get("/status")
    async def status() -> DirectoryStatus:
        """Whether directory sign-in works now (for the sign-in page's notice); asked of the directory at most
        every 30 s. It says nothing of any user."""
        s = await svc().users.directory.status()
        return DirectoryStatus(directory="ok" if s == "ok" else "off" if s == "off" else "unreachable")

    @r.get("", dependencies=[Depends(admin)])
    async def show() -> DirectoryView:
        """The directory settings (never the service account's password) and the group mappings."""
        d = svc().users.directory
        v = await d.view()
        if v.enabled:
            v.status = await d.status()
        return v

    @r.put("", dependencies=[Depends(admin)])
    async def set_directory(body: dict[str, Any] = Body(...)) -> DirectoryView:
        """Point kasou at a directory (LDAPS, or StartTLS on ldap://; the certificate is always verified). The
        service account must bind first, else nothing changes; group mappings already made are kept."""
        return await svc().users.directory.set(DirectorySet.parse(body))

    @r.delete("", dependencies=[Depends(admin)])
    async def off() -> DirectoryOff:
        """Stop directory sign-in: directory users can no longer sign in, and their sessions end at the next
        re-check. Local users and break-glass are not touched."""
        return DirectoryOff(ok=True, was_on=await svc().users.directory.off())

    @r.put("/mappings/{group}", dependencies=[Depends(admin)])
    async def map_group(group: str, body: dict[str, Any] = Body(...)) -> DirectoryView:
        """What members of a directory group (its CN or DN) get: a role, departments (vendor) and desktop pools."""
        return await svc().users.directory.map(group, GroupMapping.parse(body))

    @r.delete("/mappings/{group}", dependencies=[Depends(admin)])
    async def unmap_group(group: str) -> DirectoryView:
        return await svc().users.directory.unmap(group)

    @r.post("/test", dependencies=[Depends(admin)])
    async def test(body: DirectoryTest) -> DirectoryTestResult:
        """A user as the directory has them: DN, groups (nested too), what kasou would give them; with a
        password, whether the bind succeeds."""
        return await svc().users.directory.test(body.user, body.password)

    return r
