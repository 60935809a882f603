"""A bounded QMP monitor on top of :mod:`qemu.qmp` (never a hand-written protocol).

Every command has a timeout; QMP errors become :class:`~kasou.errors.MonitorError`
carrying QEMU's ``error_class``. The timeout is sized per command (:func:`qmp_timeout`): a
base per class of command (a query, a change of the block graph or of objects, ...) times
how loaded the host is (its 1-minute load per CPU, at least 1, at most
:data:`QMP_LOAD_STRETCH_MAX`), so that a busy host's slow answers are waited for while a
hung QEMU is still found out in bounded time.

Events (a pause on an I/O error, a block job's end) reach the handler from a task that
never ends silently: a failure of the event stream is logged with the VM's name and the
stream is read again; after :data:`EVENT_FAILURES` failures within
:data:`EVENT_FAILURE_WINDOW_S` it gives up, logs that at CRITICAL and the monitor is no
longer :attr:`Monitor.healthy`, so its owner connects a new one while QEMU lives.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
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

# -- how long a QMP command may take --------------------------------------------------------

#: Base time-outs (s) per class of command on an idle host.
QMP_BASE_TIMEOUT_S: dict[str, float] = {
    "query": 10.0,  # query-*: QEMU answers from memory
    "run": 10.0,  # stop, cont, quit, system_reset, ...: the main loop acts at once
    "connect": 10.0,  # the greeting and qmp_capabilities
    "change": 20.0,  # objects, block nodes and jobs, NBD exports, migration set-up: files, TLS, threads
}
QMP_LOAD_STRETCH_MAX = 8.0  # a loaded host stretches a time-out at most this much
QMP_TIMEOUT_MAX_S = 120.0  # and never beyond this: a hung QEMU is found out within two minutes

_RUN = frozenset({"stop", "cont", "quit", "system_reset", "system_powerdown", "system_wakeup", "qmp_capabilities"})


def command_class(command: str) -> str:
    """The class of a QMP command for its time-out: ``query``, ``run`` or ``change``."""
    if command.startswith(("query-", "x-debug-query-")):
        return "query"
    if command in _RUN:
        return "run"
    return "change"


def load_stretch(load_1m: float, cpus: int) -> float:
    """How much a host's load stretches a time-out: its 1-minute load per CPU, between 1 and the maximum."""
    per_cpu = load_1m / max(1, cpus)
    return min(QMP_LOAD_STRETCH_MAX, max(1.0, per_cpu))


def qmp_timeout(command: str, load_1m: float = 0.0, cpus: int = 1, kind: str | None = None) -> float:
    """The time-out of one QMP ``command`` on a host with this load and CPU count (``kind``: its class)."""
    base = QMP_BASE_TIMEOUT_S[kind or command_class(command)]
    return min(QMP_TIMEOUT_MAX_S, base * load_stretch(load_1m, cpus))


def host_load() -> tuple[float, int]:
    """This host's 1-minute load average and the CPUs this process may use."""
    try:
        load = os.getloadavg()[0]
    except OSError:
        load = 0.0
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    return load, cpus


EVENT_FAILURES = 5  # failures of the event stream within the window below before it is given up
EVENT_FAILURE_WINDOW_S = 60.0


class Monitor:
    """One QMP connection to one QEMU process."""

    def __init__(self, vm_name: str, socket_path: Path, on_event: EventHandler | None = None) -> None:
        self.vm_name = vm_name
        self.socket_path = socket_path
        self._client = QMPClient(vm_name)
        self._on_event = on_event
        self._events_task: asyncio.Task[None] | None = None
        self.events_error: str | None = None  # why the event stream was given up, if it was

    @property
    def connected(self) -> bool:
        return self._client.runstate == Runstate.RUNNING

    @property
    def healthy(self) -> bool:
        """Connected, and (with a handler) its events still arrive."""
        if not self.connected:
            return False
        return self._on_event is None or (self._events_task is not None and not self._events_task.done())

    async def connect(self, timeout: float | None = None) -> None:
        """Connect and negotiate capabilities, retrying while QEMU sets up its socket (``timeout``:
        default by the host's load, see :func:`qmp_timeout`)."""
        if timeout is None:
            timeout = qmp_timeout("qmp_capabilities", *host_load(), kind="connect")
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
        loop = asyncio.get_running_loop()
        failures: list[float] = []
        while True:
            try:
                async for event in self._client.events:
                    await self._deliver(event)
                raise RuntimeError("the event stream ended")  # qemu.qmp's never does by itself
            except asyncio.CancelledError:
                raise
            except Exception as e:
                now = loop.time()
                failures = [t for t in failures if now - t < EVENT_FAILURE_WINDOW_S] + [now]
                if len(failures) >= EVENT_FAILURES:
                    self.events_error = f"{type(e).__name__}: {e}"
                    log.critical(
                        "QMP events of VM %s given up after %d failures in %.0f s (last: %s): its I/O-error "
                        "pauses and block-job events are not seen until its monitor is connected again",
                        self.vm_name, len(failures), EVENT_FAILURE_WINDOW_S, self.events_error,
                    )  # fmt: skip
                    return
                log.error(
                    "QMP event stream of VM %s failed (%s: %s); reading it again", self.vm_name, type(e).__name__, e
                )
                await asyncio.sleep(0.1 * len(failures))

    async def _deliver(self, event: Any) -> None:
        assert self._on_event is not None
        try:
            data = event.get("data")
            result = self._on_event(str(event["event"]), data if isinstance(data, dict) else {})
            if asyncio.iscoroutine(result):
                await result
        except asyncio.CancelledError:
            raise
        except Exception:  # a handler's bug must not kill the pump
            log.exception("QMP event handler failed for VM %s", self.vm_name)

    async def execute(self, command: str, arguments: dict[str, Any] | None = None, timeout: float | None = None) -> Any:
        """Run one QMP command; bounded (``timeout``: default by its class and the host's load, see
        :func:`qmp_timeout`); errors become MonitorError / OperationTimeout."""
        if timeout is None:
            timeout = qmp_timeout(command, *host_load())
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
