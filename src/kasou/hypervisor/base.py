"""The driver interface every hypervisor backend implements (QEMU, fake).

Modelled on Nova's virt driver boundary: the agent asks for VMs by name with a
:class:`LaunchSpec` and gets back :class:`RuntimeInfo`; how the backend does it
(command lines, monitors, pids) never leaves the driver.
"""

from __future__ import annotations

import abc
from enum import StrEnum

from pydantic import BaseModel, ConfigDict

from kasou.model.spec import NicSpec


class LaunchDisk(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str
    path: str
    format: str = "qcow2"
    readonly: bool = False


class LaunchSpec(BaseModel):
    """Everything a host needs to run one VM; sent by the control plane to an agent."""

    model_config = ConfigDict(extra="forbid")

    name: str
    uuid: str
    vcpus: int
    memory_mib: int
    image: str | None = None  # boot kernel and initramfs of this image; None: firmware boots the disk
    kernel_args_extra: str = ""
    disks: list[LaunchDisk] = []
    nics: list[NicSpec] = []
    paused: bool = False  # start with the vCPUs stopped (-S)


class RuntimeState(StrEnum):
    RUNNING = "running"
    PAUSED = "paused"
    SHUTTING_DOWN = "shutting_down"  # powerdown asked, guest not gone yet
    EXITED = "exited"  # the process ended on request or by the guest's own power-off
    CRASHED = "crashed"  # the process ended without anyone asking


class RuntimeInfo(BaseModel):
    """What a host knows of one VM's process, right now."""

    name: str
    state: RuntimeState
    pid: int | None = None
    started_at: float | None = None  # epoch seconds the process started
    accelerator: str | None = None
    guest_ready: bool = False
    guest_uptime_s: float | None = None
    heartbeat_age_s: float | None = None
    exit_reason: str | None = None


class Driver(abc.ABC):
    """A hypervisor backend. Every method is bounded in time and raises KasouError subclasses."""

    @abc.abstractmethod
    async def attach_all(self) -> list[str]:
        """Find the VMs this host already runs (after an agent restart) and monitor them again."""

    @abc.abstractmethod
    async def start(self, spec: LaunchSpec) -> RuntimeInfo:
        """Start a VM's process. Never starts a second one for a name that runs; on failure leaves nothing."""

    @abc.abstractmethod
    async def powerdown(self, name: str) -> None:
        """Press the ACPI power button (a graceful shutdown the guest carries out)."""

    @abc.abstractmethod
    async def stop(self, name: str) -> None:
        """End the VM's process at once and wait until it is gone."""

    @abc.abstractmethod
    async def reset(self, name: str) -> None:
        """Hard reset of the virtual machine (the process stays)."""

    @abc.abstractmethod
    async def pause(self, name: str) -> None: ...

    @abc.abstractmethod
    async def resume(self, name: str) -> None: ...

    @abc.abstractmethod
    async def info(self, name: str) -> RuntimeInfo | None:
        """The VM's runtime state, or None if this host knows nothing of it."""

    @abc.abstractmethod
    async def list(self) -> list[RuntimeInfo]: ...

    @abc.abstractmethod
    async def forget(self, name: str) -> None:
        """Drop what is remembered of an exited or crashed VM (its runtime files)."""

    @abc.abstractmethod
    async def console_log(self, name: str, max_bytes: int = 65536) -> str:
        """The tail of the VM's serial console output."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Stop monitoring (the VMs keep running)."""
