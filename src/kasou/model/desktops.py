"""Desktop pools: N desktop VMs as linked clones of one template, handed to clinicians at sign-in.

A *desktop pool* (``kasou pool-desktop``, ``/v1/desktop-pools``) is a different thing from a
storage pool (``kasou pool``). Its desktops are named ``<pool>-01``, ``<pool>-02``, ...

The console policy is about medical data: a desktop shows its screen and takes the keyboard and
mouse, and nothing else crosses to the endpoint (no clipboard, no file transfer, no USB
redirection) unless its pool allows it.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt

from kasou.errors import InvalidSpec
from kasou.model.names import NAME_MAX, validate_name
from kasou.model.parsing import parse_model

MAX_DESKTOPS = 99  # names end in two digits: <pool>-01 .. <pool>-99
MAX_IDLE_MINUTES = 24 * 60
DESKTOP_SUFFIX_LEN = 3  # "-NN"


class ConsolePolicy(BaseModel):
    """What a VM's console may carry besides the screen, keyboard and mouse. All False unless a
    desktop pool allows it; for a VM that is not a pool's desktop, all False too."""

    clipboard: bool = False
    file_transfer: bool = False
    usb: bool = False
    record: bool = False  # the console is recorded (staff's and vendors' consoles always are: kasou.api.recordings)


def desktop_name(pool: str, index: int) -> str:
    """The VM name of a pool's desktop number ``index`` (1-based)."""
    return f"{pool}-{index:02d}"


def validate_pool_name(name: object) -> str:
    """A desktop pool's name: a kasou name short enough for ``<name>-NN`` to be one too."""
    validate_name(name, "pool")
    assert isinstance(name, str)
    if len(name) > NAME_MAX - DESKTOP_SUFFIX_LEN:
        raise InvalidSpec(
            f"pool is {len(name)} characters long; a desktop pool's name has at most "
            f"{NAME_MAX - DESKTOP_SUFFIX_LEN} (its desktops are named {name[:8]}...-01)",
            field="pool",
        )
    return name


def check_sizes(size: int, prestart: int) -> None:
    if not 1 <= size <= MAX_DESKTOPS:
        raise InvalidSpec(f"size must be between 1 and {MAX_DESKTOPS} desktops, not {size}", field="size")
    if not 0 <= prestart <= size:
        raise InvalidSpec(f"prestart must be between 0 and the pool's size ({size}), not {prestart}", field="prestart")


class DesktopPoolCreate(BaseModel):
    """What ``kasou pool-desktop create`` and ``POST /v1/desktop-pools`` take."""

    model_config = ConfigDict(extra="forbid")

    name: str
    template: str
    size: StrictInt
    prestart: StrictInt = 0  # desktops kept booted and free, so a sign-in gets one at once
    persistent: StrictBool = False  # a desktop stays its user's and is never reset
    idle_minutes: StrictInt | None = None  # return a desktop after this long without a request of its session
    allow_clipboard: StrictBool = False
    allow_file_transfer: StrictBool = False
    allow_usb: StrictBool = False
    record: StrictBool = False  # record the desktops' console sessions (kasou.api.recordings)
    description: str = Field("", max_length=500)

    @classmethod
    def parse(cls, data: Any) -> DesktopPoolCreate:
        spec: DesktopPoolCreate = parse_model(cls, data)
        spec.check()
        return spec

    def check(self) -> None:
        validate_pool_name(self.name)
        validate_name(self.template, "template")
        check_sizes(self.size, self.prestart)
        if self.idle_minutes is not None and not 1 <= self.idle_minutes <= MAX_IDLE_MINUTES:
            raise InvalidSpec(
                f"idle_minutes must be between 1 and {MAX_IDLE_MINUTES}, not {self.idle_minutes}", field="idle_minutes"
            )

    def policy(self) -> ConsolePolicy:
        allow = {"clipboard": self.allow_clipboard, "file_transfer": self.allow_file_transfer, "usb": self.allow_usb}
        return ConsolePolicy(**allow, record=self.record)


class DesktopPoolResize(BaseModel):
    """What ``kasou pool-desktop resize`` and ``PATCH /v1/desktop-pools/{name}`` take."""

    model_config = ConfigDict(extra="forbid")

    size: StrictInt | None = None
    prestart: StrictInt | None = None
    record: StrictBool | None = None  # record the desktops' console sessions from now on

    @classmethod
    def parse(cls, data: Any) -> DesktopPoolResize:
        spec: DesktopPoolResize = parse_model(cls, data)
        if spec.size is None and spec.prestart is None and spec.record is None:
            raise InvalidSpec("nothing to change: give size, prestart or record", field="size")
        return spec


class ReleaseRequest(BaseModel):
    """``POST /v1/portal/desktop/release``: give back the user's desktops, of this pool only if given."""

    model_config = ConfigDict(extra="forbid")

    pool: str | None = None


class DesktopRequest(BaseModel):
    """``POST /v1/portal/desktop``: a desktop of this pool for the signed-in user."""

    model_config = ConfigDict(extra="forbid")

    pool: str

    @classmethod
    def parse(cls, data: Any) -> DesktopRequest:
        spec: DesktopRequest = parse_model(cls, data)
        validate_pool_name(spec.pool)
        return spec
