"""The records and views of desktop pools (see :mod:`kasou.control.desktops`): what the store keeps for a
pool and for one desktop, and what the API shows of them to administrators and on the portal."""

from __future__ import annotations

import hashlib
import time
from typing import Literal

from pydantic import BaseModel, Field

from kasou.model.desktops import DesktopPoolCreate
from kasou.model.state import VMState

PoolState = Literal["creating", "ready", "resizing", "deleting"]
DesktopState = Literal["free", "assigned", "resetting"]


class DesktopPoolRecord(BaseModel):
    spec: DesktopPoolCreate
    state: PoolState = "creating"
    desktops: list[str] = []
    created_at: float = Field(default_factory=time.time)


class DesktopRecord(BaseModel):
    vm: str
    pool: str
    state: DesktopState = "free"
    user: str | None = None  # while assigned; in a persistent pool also after (its owner)
    session: str | None = None  # the session id (SHA-256 of the cookie token) it was handed to
    since: float | None = None
    clean: bool = True  # no session has used it since its last reset


class DesktopView(BaseModel):
    vm: str
    pool: str
    state: DesktopState
    user: str | None
    since: float | None
    vm_state: VMState | None  # None: its VM is missing
    guest_ready: bool
    console: str  # the console page of the web UI


class DesktopPoolView(BaseModel):
    name: str
    template: str
    state: PoolState
    size: int
    prestart: int
    persistent: bool
    idle_minutes: int | None
    allow_clipboard: bool
    allow_file_transfer: bool
    allow_usb: bool
    record: bool = False  # its console sessions are recorded
    description: str
    created_at: float
    in_use: int
    free_ready: int  # free desktops whose guest is up: sign-ins served at once
    desktops: list[DesktopView]


class PortalPool(BaseModel):
    """A pool as a clinician sees it on the portal."""

    name: str
    description: str
    size: int
    free: int
    my_desktop: str | None


def session_id(token: str) -> str:
    """The id under which ``sessions/`` keeps a session (kasou.control.users)."""
    return hashlib.sha256(token.encode()).hexdigest()
