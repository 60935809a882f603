"""A bounded QMP monitor on top of :mod:`qemu.qmp` (never a hand-written protocol).

Every command has a timeout; QMP errors become :class:`~kasou.errors.MonitorError`
carrying QEMU's ``error_class``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from qemu.qmp import ExecuteError, QMPClient, QMPError
from qemu.qmp.protocol import Runstate

from kasou.errors import MonitorError, OperationTimeout

log = logging.getLogger(__name__)

# qemu.qmp logs every disconnect at WARNING/ERROR; a QEMU that exits is routine for us.
logging.getLogger("qemu.qmp").setLevel(logging.CRITICAL)

EventHandler = Callable[[str, dict[str, Any]], Awaitable[None] | None]


class Monitor:
    """One QMP connection to one QEMU process."""

    def __init__(self, vm_name: str, socket_path: Path, on_event: EventHandler | None = None) -> None:
        self.vm_name = vm_name
        self.socket_path = socket_path
        self._client = QMPClient(vm_name)
        self._on_event = on_event
        self._events_task: asyncio.Task[None] | None = None

    @property
    def connected(self) -> bool:
        return self._client.runstate == Runstate.RUNNING

    async def connect(self, timeout: float = 10.0) -> None:
        """Connect and negotiate capabilities, retrying while QEMU sets up its socket."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        last: Exception | None = None
        while loop.time() < deadline:
            try:
                await asyncio.wait_for(self._client.connect(str(self.socket_path)), deadline - loop.time())
                break
            except (TimeoutError, QMPError, OSError) as e:
                last = e
                with contextlib.suppress(Exception):
                    await self._client.disconnect()
                await asyncio.sleep(0.05)
        else:
            raise MonitorError(f"cannot reach the QMP monitor of VM {self.vm_name!r}: {last}")
        if self._on_event is not None:
            self._events_task = asyncio.create_task(self._pump_events(), name=f"qmp-events-{self.vm_name}")

    async def _pump_events(self) -> None:
        assert self._on_event is not None
        try:
            async for event in self._client.events:
                try:
                    data = event.get("data")
                    result = self._on_event(str(event["event"]), data if isinstance(data, dict) else {})
                    if asyncio.iscoroutine(result):
                        await result
                except Exception:  # a handler's bug must not kill the pump
                    log.exception("QMP event handler failed for %s", self.vm_name)
        except asyncio.CancelledError:
            raise
        except Exception:
            return

    async def execute(self, command: str, arguments: dict[str, Any] | None = None, timeout: float = 10.0) -> Any:
        """Run one QMP command; bounded; errors become MonitorError / OperationTimeout."""
        if not self.connected:
            raise MonitorError(f"the QMP monitor of VM {self.vm_name!r} is not connected")
        try:
            return await asyncio.wait_for(self._client.execute(command, arguments), timeout)
        except ExecuteError as e:
            raise MonitorError(
                f"QEMU refused {command} for VM {self.vm_name!r}: {e}",
                error_class=e.error_class,
                command=command,
            ) from None
        except TimeoutError:
            raise OperationTimeout(f"QMP {command} on VM {self.vm_name!r} gave no answer in {timeout:.0f} s") from None
        except (QMPError, OSError, EOFError) as e:
            raise MonitorError(f"QMP {command} on VM {self.vm_name!r} failed: {e}", command=command) from None

    async def send_fd(self, fdname: str, fd: int) -> None:
        """Hand QEMU an open file descriptor under ``fdname`` (SCM_RIGHTS, then ``getfd``): QEMU writes or
        reads a file the agent opened, so a sandboxed QEMU needs neither the path nor ``exec:``."""
        if not self.connected:
            raise MonitorError(f"the QMP monitor of VM {self.vm_name!r} is not connected")
        try:
            self._client.send_fd_scm(fd)
        except (QMPError, OSError) as e:
            raise MonitorError(f"cannot pass a file to VM {self.vm_name!r}: {e}", command="getfd") from None
        await self.execute("getfd", {"fdname": fdname})

    async def close(self) -> None:
        if self._events_task is not None:
            self._events_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._events_task
            self._events_task = None
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._client.disconnect(), 5.0)
