"""Two fake hosts (agent + FakeDriver, in process), for the agent-to-agent tests (migration, replication); a fake QMP."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from kasou.agent.app import Agent, create_agent_app
from kasou.agent.client import AgentClient
from kasou.agent.storage import LocalDisks
from tests.doubles.driver import FakeDriver


@dataclass
class Host:
    driver: FakeDriver
    client: AgentClient
    disks: Path


def make_host(tmp: Path, name: str, address: str) -> Host:
    driver = FakeDriver()
    agent = Agent(
        host=name,
        driver=driver,
        disks=LocalDisks(tmp / name / "disks", tmp / "images"),
        accelerator="tcg",
        accelerator_reason="test",
        qemu_version="7.2",
        images=lambda: ["tiny"],
        migration_address=address,
    )
    client = AgentClient(name, transport=httpx.ASGITransport(app=create_agent_app(agent)))
    return Host(driver, client, tmp / name / "disks")


@pytest.fixture
async def hosts(tmp_path: Path) -> AsyncIterator[tuple[Host, Host]]:
    a = make_host(tmp_path, "host-a", "10.0.0.1")
    b = make_host(tmp_path, "host-b", "10.0.0.2")
    yield a, b
    await a.client.close()
    await b.client.close()


class Qmp:
    """Records every command; answers from handlers (a callable, a value, or an exception to raise)."""

    def __init__(self, **handlers: Any) -> None:
        self.calls: list[tuple[str, dict[str, Any] | None]] = []
        self.handlers = {k.replace("_", "-"): v for k, v in handlers.items()}

    async def __call__(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        self.calls.append((command, arguments))
        h = self.handlers.get(command, {})
        if isinstance(h, BaseException):
            raise h
        result = h(arguments) if callable(h) else h
        if isinstance(result, BaseException):
            raise result
        return result

    def names(self) -> list[str]:
        return [c for c, _ in self.calls]
