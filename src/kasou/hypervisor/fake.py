"""A driver with no hypervisor behind it, for fast functional tests of everything above.

It keeps the same contract as the QEMU driver (states, errors, never two copies
of one VM) and lets a test make a VM crash or a start fail.
"""

from __future__ import annotations

import time

from kasou.errors import Conflict, NotFound, QemuStartError
from kasou.hypervisor.base import Driver, LaunchSpec, RuntimeInfo, RuntimeState

_ACTIVE = (RuntimeState.RUNNING, RuntimeState.PAUSED, RuntimeState.SHUTTING_DOWN)


class FakeDriver(Driver):
    def __init__(self, accelerator: str = "tcg") -> None:
        self.accelerator = accelerator
        self.vms: dict[str, RuntimeInfo] = {}
        self.specs: dict[str, LaunchSpec] = {}
        self.fail_next_start: str | None = None  # the message of a start that should fail
        self.powerdown_exits = True  # a guest that honours the ACPI power button
        self._next_pid = 1000

    def crash(self, name: str) -> None:
        """Test hook: the VM's process dies by itself."""
        info = self.vms[name]
        self.vms[name] = info.model_copy(
            update={"state": RuntimeState.CRASHED, "pid": None, "exit_reason": "killed"}
        )

    async def attach_all(self) -> list[str]:
        return [n for n, i in self.vms.items() if i.state in _ACTIVE]

    async def start(self, spec: LaunchSpec) -> RuntimeInfo:
        cur = self.vms.get(spec.name)
        if cur is not None and cur.state in _ACTIVE:
            raise Conflict(f"VM {spec.name!r} already runs on this host (pid {cur.pid})")
        if self.fail_next_start is not None:
            msg, self.fail_next_start = self.fail_next_start, None
            raise QemuStartError(f"QEMU refused to start VM {spec.name!r}: {msg}")
        self._next_pid += 1
        info = RuntimeInfo(
            name=spec.name,
            state=RuntimeState.PAUSED if spec.paused else RuntimeState.RUNNING,
            pid=self._next_pid,
            started_at=time.time(),
            accelerator=self.accelerator,
            guest_ready=True,
            guest_uptime_s=0.0,
            heartbeat_age_s=0.0,
        )
        self.vms[spec.name] = info
        self.specs[spec.name] = spec
        return info

    def _active(self, name: str) -> RuntimeInfo:
        info = self.vms.get(name)
        if info is None or info.state not in _ACTIVE:
            raise NotFound(f"VM {name!r} is not running on this host")
        return info

    def _set(self, name: str, state: RuntimeState, **extra: object) -> None:
        self.vms[name] = self.vms[name].model_copy(update={"state": state, **extra})

    async def powerdown(self, name: str) -> None:
        self._active(name)
        if self.powerdown_exits:
            self._set(name, RuntimeState.EXITED, pid=None, exit_reason="guest-shutdown")
        else:
            self._set(name, RuntimeState.SHUTTING_DOWN)

    async def stop(self, name: str) -> None:
        if name not in self.vms:
            raise NotFound(f"VM {name!r} is not running on this host")
        if self.vms[name].state in _ACTIVE:
            self._set(name, RuntimeState.EXITED, pid=None, exit_reason="stopped")

    async def reset(self, name: str) -> None:
        self._active(name)
        self._set(name, RuntimeState.RUNNING, guest_uptime_s=0.0)

    async def pause(self, name: str) -> None:
        self._active(name)
        self._set(name, RuntimeState.PAUSED)

    async def resume(self, name: str) -> None:
        self._active(name)
        self._set(name, RuntimeState.RUNNING)

    async def info(self, name: str) -> RuntimeInfo | None:
        return self.vms.get(name)

    async def list(self) -> list[RuntimeInfo]:
        return [self.vms[n] for n in sorted(self.vms)]

    async def forget(self, name: str) -> None:
        info = self.vms.get(name)
        if info is not None and info.state in _ACTIVE:
            raise Conflict(f"VM {name!r} still runs; stop it first")
        self.vms.pop(name, None)
        self.specs.pop(name, None)

    async def console_log(self, name: str, max_bytes: int = 65536) -> str:
        if name not in self.specs:
            raise NotFound(f"VM {name!r} has no console output on this host")
        return f"KASOU-READY\nfake console of {name}\n"[-max_bytes:]
