"""Two fake hosts (agent + FakeDriver, in process), for the agent-to-agent tests (migration, replication)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from kasou.agent.app import Agent, create_agent_app
from kasou.agent.client import AgentClient
from kasou.agent.storage import LocalDisks
from kasou.hypervisor.fake import FakeDriver


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
