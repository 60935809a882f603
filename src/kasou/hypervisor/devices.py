"""The rules every driver applies to a device plugged into or out of a running VM (the QEMU driver and the
contract's fake share them, so both refuse the same things with the same words)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, TypeVar

from kasou.errors import Conflict, NotFound


class Device(Protocol):
    @property
    def id(self) -> str: ...

    @property
    def port(self) -> int | None: ...


D = TypeVar("D", bound=Device)


def check_new(vm: str, kind: str, devices: Sequence[Device], device_id: str) -> None:
    """A new ``kind`` (``disk``, ``NIC``) must not take the id of one the VM has."""
    if any(d.id == device_id for d in devices):
        raise Conflict(f"VM {vm!r} has a {kind} {device_id} already")


def unpluggable(vm: str, kind: str, devices: Sequence[D], device_id: str) -> D:
    """The device to unplug: NotFound if the VM has none of that id; Conflict if it sits on the root bus."""
    device = next((d for d in devices if d.id == device_id), None)
    if device is None:
        raise NotFound(f"VM {vm!r} has no {kind} {device_id}")
    if device.port is None:
        raise Conflict(
            f"{kind} {device_id} of VM {vm!r} is on the machine's root bus, where QEMU cannot unplug it: "
            "stop the VM and remove it then"
        )
    return device
