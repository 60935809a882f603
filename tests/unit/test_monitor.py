"""The QMP event stream never ends silently: a failure is logged and the stream read again; a monitor
whose connection drops while QEMU lives is connected again and the VM's state caught up.

A fake QMP server on a unix socket stands in for QEMU (greeting, capabilities, ``query-status``, events).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from kasou.errors import OperationTimeout
from kasou.hypervisor.base import RuntimeState
from kasou.hypervisor.qemu import monitor as qmon
from kasou.hypervisor.qemu.driver import QemuDriver
from kasou.hypervisor.qemu.driver_core import QemuVm
from kasou.hypervisor.qemu.monitor import Monitor


class FakeQmp:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.paused = False
        self.delay: dict[str, float] = {}  # command -> seconds before its answer
        self.connections = 0
        self._writers: list[asyncio.StreamWriter] = []
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._server = await asyncio.start_unix_server(self._serve, path=str(self.path))

    async def _send(self, writer: asyncio.StreamWriter, msg: dict[str, Any]) -> None:
        writer.write(json.dumps(msg).encode() + b"\r\n")
        await writer.drain()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._writers.append(writer)
        version = {"qemu": {"major": 7, "minor": 2, "micro": 0}, "package": ""}
        with contextlib.suppress(ConnectionError, OSError):
            await self._send(writer, {"QMP": {"version": version, "capabilities": []}})
            async for msg in self._messages(reader):
                ret: Any = {}
                await asyncio.sleep(self.delay.get(msg.get("execute", ""), 0.0))
                if msg.get("execute") == "query-status":
                    ret = {"status": "paused" if self.paused else "running", "running": not self.paused}
                await self._send(writer, {"return": ret, **({"id": msg["id"]} if "id" in msg else {})})

    @staticmethod
    async def _messages(reader: asyncio.StreamReader) -> AsyncIterator[dict[str, Any]]:
        """QMP clients send JSON objects back to back, not lines: decode them as a stream."""
        decoder, buf = json.JSONDecoder(), ""
        while chunk := await reader.read(4096):
            buf += chunk.decode()
            while buf.strip():
                try:
                    msg, end = decoder.raw_decode(buf.lstrip())
                except ValueError:
                    break
                buf = buf.lstrip()[end:]
                yield msg

    async def event(self, name: str) -> None:
        ts = {"seconds": 0, "microseconds": 0}
        await self._send(self._writers[-1], {"event": name, "data": {}, "timestamp": ts})

    def drop(self) -> None:
        """The connection ends (as a protocol error on QEMU's side would end it); the 'QEMU' lives on."""
        self._writers[-1].close()

    async def close(self) -> None:
        for w in self._writers:
            w.close()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()


@pytest.fixture
async def fake_qmp(tmp_path: Path) -> AsyncIterator[FakeQmp]:
    srv = FakeQmp(tmp_path / "run" / "emr1" / "qmp.sock")
    await srv.start()
    yield srv
    await srv.close()


async def until(check: Callable[[], object], what: str, timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not check():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


async def test_a_failed_event_stream_is_logged_and_read_again(
    fake_qmp: FakeQmp, caplog: pytest.LogCaptureFixture
) -> None:
    """Before: the pump returned silently on the first exception; no later event (an I/O-error pause) arrived."""
    got: list[str] = []
    mon = Monitor("emr1", fake_qmp.path, on_event=lambda ev, data: got.append(ev))
    listener = mon._client.events
    real_get = listener.get
    broken = {"left": 1}

    async def flaky_get() -> Any:
        if broken["left"]:
            broken["left"] -= 1
            raise RuntimeError("the stream broke")
        return await real_get()

    listener.get = flaky_get  # type: ignore[method-assign]  # its first read fails
    caplog.set_level(logging.ERROR, logger="kasou.hypervisor.qemu.monitor")
    await mon.connect(timeout=5)
    try:
        await fake_qmp.event("RESUME")
        await fake_qmp.event("BLOCK_IO_ERROR")
        await until(lambda: got == ["RESUME", "BLOCK_IO_ERROR"], "the events after the failure")
        logged = [r.getMessage() for r in caplog.records]
        assert any("emr1" in m and "the stream broke" in m for m in logged), logged
        assert mon.healthy
    finally:
        await mon.close()


async def test_an_event_stream_failing_again_and_again_is_given_up_loudly(
    fake_qmp: FakeQmp, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(qmon, "EVENT_FAILURES", 3)
    mon = Monitor("emr1", fake_qmp.path, on_event=lambda ev, data: None)
    await mon.connect(timeout=5)
    try:

        async def broken_get() -> Any:
            raise RuntimeError("the stream broke")

        mon._client.events.get = broken_get  # type: ignore[method-assign]
        caplog.set_level(logging.ERROR, logger="kasou.hypervisor.qemu.monitor")
        await fake_qmp.event("RESUME")
        await until(lambda: not mon.healthy, "the monitor to say its events are gone")
        assert mon.events_error == "RuntimeError: the stream broke"
        assert any(r.levelno == logging.CRITICAL and "emr1" in r.getMessage() for r in caplog.records)
    finally:
        await mon.close()


async def test_a_dropped_monitor_of_a_live_qemu_is_connected_again(
    fake_qmp: FakeQmp, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Before: nothing connected the monitor again until some command ran; a pause on an I/O error in the
    meantime (and every later event) went unseen, and nothing was logged."""
    driver = QemuDriver(run_dir=tmp_path / "run", serial_log_dir=tmp_path / "log", images_dir=tmp_path,
                        accelerator="tcg")  # fmt: skip
    vm = QemuVm("emr1", driver._files("emr1"), pid=os.getpid(), started_at=None, accelerator="tcg")
    driver._vms["emr1"] = vm  # a QEMU 'running' here: this test's own process stands in for its pid
    caplog.set_level(logging.WARNING, logger="kasou.hypervisor.qemu.driver_core")
    try:
        await driver._monitor(vm)
        driver._ensure_reaper()
        assert fake_qmp.connections == 1
        fake_qmp.paused = True  # the guest pauses (an I/O error) while no one listens
        fake_qmp.drop()
        await until(lambda: fake_qmp.connections == 2, "the monitor to connect again")
        await until(lambda: vm.state == RuntimeState.PAUSED, "the pause to be caught up")
        await fake_qmp.event("RESUME")  # and events arrive again
        await until(lambda: vm.state == RuntimeState.RUNNING, "the RESUME event")
        logged = [r.getMessage() for r in caplog.records]
        assert any("emr1" in m and "connecting again" in m for m in logged), logged
    finally:
        await driver.close()


# -- time-outs sized per command and by the host's load ------------------------------------------


@pytest.mark.parametrize(
    ("command", "kind"),
    [("query-status", "query"), ("x-debug-query-block-graph", "query"), ("cont", "run"), ("quit", "run"),
     ("object-add", "change"), ("blockdev-add", "change"), ("blockdev-mirror", "change"), ("migrate", "change"),
     ("nbd-server-start", "change"), ("job-dismiss", "change")],
)  # fmt: skip
def test_command_classes(command: str, kind: str) -> None:
    assert qmon.command_class(command) == kind


def test_load_stretch_is_load_per_cpu_between_one_and_the_cap() -> None:
    assert qmon.load_stretch(0.0, 2) == 1.0  # idle: the base
    assert qmon.load_stretch(1.5, 2) == 1.0  # below one per CPU: the base
    assert qmon.load_stretch(6.0, 2) == 3.0
    assert qmon.load_stretch(50.0, 2) == qmon.QMP_LOAD_STRETCH_MAX  # the lab under load: capped
    assert qmon.load_stretch(4.0, 0) == 4.0  # no CPU count: taken as one


def test_qmp_timeout_by_class_and_load() -> None:
    """The lab at load ~50 on 2 CPUs: object-add had a flat 10 s and timed out; it gets 20 s x 8 now."""
    assert qmon.qmp_timeout("query-status") == 10.0
    assert qmon.qmp_timeout("object-add") == 20.0
    assert qmon.qmp_timeout("object-add", load_1m=6.0, cpus=2) == 60.0
    assert qmon.qmp_timeout("object-add", load_1m=50.0, cpus=2) == qmon.QMP_TIMEOUT_MAX_S
    assert qmon.qmp_timeout("query-migrate", load_1m=50.0, cpus=2) == 80.0
    assert qmon.qmp_timeout("anything", load_1m=50.0, cpus=2, kind="connect") == 80.0
    for load in (0.0, 1.0, 10.0, 1000.0):  # never below the base, never beyond the bound
        for cmd in ("query-status", "cont", "object-add"):
            t = qmon.qmp_timeout(cmd, load, 2)
            assert qmon.QMP_BASE_TIMEOUT_S[qmon.command_class(cmd)] <= t <= qmon.QMP_TIMEOUT_MAX_S


def test_host_load_reads_this_host() -> None:
    load, cpus = qmon.host_load()
    assert load >= 0.0 and cpus >= 1


async def test_execute_waits_longer_on_a_loaded_host(fake_qmp: FakeQmp, monkeypatch: pytest.MonkeyPatch) -> None:
    """A command that answers late: past its base time-out on an idle host, within it stretched by the load."""
    monkeypatch.setattr(qmon, "QMP_BASE_TIMEOUT_S", {**qmon.QMP_BASE_TIMEOUT_S, "change": 0.2})
    fake_qmp.delay["object-add"] = 0.5
    mon = Monitor("emr1", fake_qmp.path)
    await mon.connect(timeout=5)
    try:
        monkeypatch.setattr(qmon, "host_load", lambda: (0.0, 2))
        with pytest.raises(OperationTimeout, match=r"QMP object-add on VM 'emr1' gave no answer in 0 s"):
            await mon.execute("object-add", {"qom-type": "x", "id": "a"})
        monkeypatch.setattr(qmon, "host_load", lambda: (50.0, 2))  # 0.2 s x 8
        assert await mon.execute("object-add", {"qom-type": "x", "id": "b"}) == {}
    finally:
        await mon.close()
