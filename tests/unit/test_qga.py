"""The guest agent client against a fake ``qemu-ga`` (tests/doubles/qga.py): resync, timeouts, freeze."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from kasou.errors import GuestAgentError, OperationTimeout
from kasou.hypervisor.qemu import qga
from tests.doubles.qga import FakeGuestAgent


@pytest.fixture
def sock(tmp_path: Path) -> Path:
    return tmp_path / "qga.sock"


async def test_ping_and_details(sock: Path) -> None:
    async with FakeGuestAgent(sock) as fake:
        agent = qga.GuestAgent(sock)
        state = qga.AgentState()
        await qga.poll_once(agent, state)
        assert state.answering and state.last_answer is not None
        assert state.os == "Debian GNU/Linux 12 (bookworm)"
        assert state.hostname == "emr-db1"
        assert state.ips == ["10.0.2.15"]  # loopback and link-local left out
        assert fake.commands[0] == "guest-sync-delimited"  # a new connection is resynchronised first
        await qga.poll_once(agent, state)  # details are not read again so soon
        assert fake.commands.count("guest-get-host-name") == 1
        assert fake.commands.count("guest-sync-delimited") == 1  # the connection is kept
        await agent.close()


async def test_stale_bytes_before_the_sync_are_skipped(sock: Path) -> None:
    async with FakeGuestAgent(sock) as fake:
        fake.stale = b'{"return": 12}\n{"broken\n\xff{"return": 99}\n'
        agent = qga.GuestAgent(sock)
        await agent.ping()
        assert await agent.hostname() == "emr-db1"
        await agent.close()


async def test_a_guest_without_an_agent_costs_a_bounded_wait(sock: Path) -> None:
    async with FakeGuestAgent(sock) as fake:
        fake.silent = True
        agent = qga.GuestAgent(sock, timeout_s=0.3)
        state = qga.AgentState()
        t0 = time.monotonic()
        await qga.poll_once(agent, state)
        assert time.monotonic() - t0 < 1.0
        assert not state.answering and state.last_answer is None
        with pytest.raises(GuestAgentError, match=r"no answer within 0\.3 s"):
            await agent.ping()
        fake.silent = False  # the agent starts inside the guest: the next call resynchronises
        await agent.ping()
        await agent.close()


async def test_no_socket_is_an_error_not_a_hang(sock: Path) -> None:
    with pytest.raises(GuestAgentError):
        await qga.GuestAgent(sock, timeout_s=0.3).ping()


async def test_error_answers_are_raised(sock: Path) -> None:
    async with FakeGuestAgent(sock) as fake:
        fake.fail["guest-get-osinfo"] = "command disabled"
        agent = qga.GuestAgent(sock)
        with pytest.raises(GuestAgentError, match="command disabled"):
            await agent.os_name()
        state = qga.AgentState()
        await qga.poll_once(agent, state)  # one missing command does not hide the rest
        assert state.answering and state.os is None and state.hostname == "emr-db1"
        await agent.close()


async def test_shutdown_has_no_answer(sock: Path) -> None:
    async with FakeGuestAgent(sock) as fake:
        agent = qga.GuestAgent(sock)
        t0 = time.monotonic()
        await agent.shutdown()
        assert fake.shutdowns == 1 and time.monotonic() - t0 < 2.0
        fake.fail["guest-shutdown"] = "shutdown disabled by policy"
        with pytest.raises(GuestAgentError, match="disabled by policy"):
            await agent.shutdown()


async def test_quiesced_freezes_and_thaws(sock: Path) -> None:
    async with FakeGuestAgent(sock) as fake:
        agent = qga.GuestAgent(sock)
        state = qga.AgentState(answering=True)
        async with qga.quiesced(agent, state) as c:
            assert fake.frozen and c == ["application"]
        assert not fake.frozen
        with pytest.raises(RuntimeError):  # the body fails: thawed all the same
            async with qga.quiesced(agent, state):
                assert fake.frozen
                raise RuntimeError("the transaction failed")
        assert not fake.frozen
        assert await agent.freeze_status() == "thawed"
        await agent.close()


async def test_a_slow_freeze_is_thawed_and_crash_consistent(sock: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(qga, "FREEZE_TIMEOUT_S", 0.2)
    async with FakeGuestAgent(sock) as fake:
        fake.freeze_delay_s = 0.5  # the guest freezes after kasou stopped waiting
        agent = qga.GuestAgent(sock)
        async with qga.quiesced(agent, qga.AgentState(answering=True)) as c:
            assert c == ["crash"]
        await asyncio.sleep(0.5)
        await agent.thaw()
        assert not fake.frozen
        await agent.close()


async def test_no_agent_is_not_asked(sock: Path) -> None:
    async with FakeGuestAgent(sock) as fake:
        async with qga.quiesced(qga.GuestAgent(sock), qga.AgentState(answering=False)) as c:
            assert c == ["crash"]
        assert fake.commands == []


async def test_poll_loop_stops_and_skips_paused(sock: Path) -> None:
    async with FakeGuestAgent(sock) as fake:
        agent, state = qga.GuestAgent(sock), qga.AgentState()
        alive = [True]
        task = asyncio.create_task(qga.poll(agent, state, lambda: alive[0], lambda: False, every_s=0.05))
        await asyncio.sleep(0.2)
        assert fake.commands == []  # a paused guest is not asked
        alive[0] = False
        await asyncio.wait_for(task, 1.0)


def test_ips_of_ignores_junk() -> None:
    assert qga.ips_of(None) == []
    assert qga.ips_of([{"ip-addresses": [{"ip-address": "nonsense"}, {"ip-address": "192.168.1.5"}]}]) == [
        "192.168.1.5"
    ]


async def test_a_refused_freeze_is_crash_consistent_and_a_failing_thaw_is_raised(sock: Path) -> None:
    async with FakeGuestAgent(sock) as fake:
        agent = qga.GuestAgent(sock)
        fake.fail["guest-fsfreeze-freeze"] = "no file system to freeze"
        async with qga.quiesced(agent, qga.AgentState(answering=True)) as c:
            assert c == ["crash"]
        assert fake.commands.count("guest-fsfreeze-thaw") == 1  # thawed all the same
        del fake.fail["guest-fsfreeze-freeze"]
        fake.fail["guest-fsfreeze-thaw"] = "thaw failed"
        with pytest.raises(GuestAgentError, match="may still be frozen"):
            async with qga.quiesced(agent, qga.AgentState(answering=True)):
                pass
        assert fake.commands.count("guest-fsfreeze-thaw") == 1 + qga.THAW_TRIES
        await agent.close()


async def test_a_program_runs_in_the_guest_and_its_output_comes_back(sock: Path) -> None:
    async with FakeGuestAgent(sock) as fake:
        fake.programs["/usr/bin/psql"] = (0, b"1\n", b"")
        fake.programs["/bin/false"] = (1, b"", b"no\n")
        agent = qga.GuestAgent(sock, timeout_s=2)
        try:
            assert await agent.run(["/usr/bin/psql", "-c", "select 1"], 10, every_s=0.01) == (0, b"1\n", b"")
            assert fake.runs[1000][1] == ["-c", "select 1"]
            assert await agent.run(["/bin/false"], 10, every_s=0.01) == (1, b"", b"no\n")
            with pytest.raises(GuestAgentError, match="No such file"):
                await agent.run(["/nope"], 10)
            fake.exec_polls = 10_000
            with pytest.raises(OperationTimeout, match=r"did not end in the guest within 0\.2 s"):
                await agent.run(["/bin/true"], 0.2, every_s=0.01)
        finally:
            await agent.close()
