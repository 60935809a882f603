"""A whole kasou (API, control plane, agent) in one process, with the fake driver.

Disks are real qcow2 files made by ``qemu-img`` in a temporary directory; the
"tiny" image is a stand-in of 1 MiB. No QEMU guest runs.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from kasou.agent.app import Agent, create_agent_app
from kasou.agent.client import AgentClient
from kasou.agent.storage import LocalDisks
from kasou.api.app import create_app
from kasou.api.deps import Services
from kasou.config import HaTimes
from kasou.control.hosts import Agents
from kasou.store.sqlite import SqliteStore
from tests.doubles.driver import FakeDriver

TOKEN = "test-token"


def make_fake_image(images: Path) -> None:
    root = images / "tiny"
    root.mkdir(parents=True)
    (root / "vmlinuz").write_bytes(b"kernel")
    (root / "initramfs.img").write_bytes(b"initrd")
    subprocess.run(["qemu-img", "create", "-q", "-f", "raw", str(root / "disk.raw"), "1M"], check=True)
    manifest = {
        "manifest_version": 1,
        "name": "tiny",
        "kernel": "vmlinuz",
        "initrd": "initramfs.img",
        "disk": "disk.raw",
        "disk_format": "raw",
        "disk_size_bytes": 1024 * 1024,
        "kernel_args": "console=ttyS0",
    }
    (root / "manifest.json").write_text(json.dumps(manifest))


def client_of(api: TestClient, **kw: Any) -> TestClient:
    """A second client of ``api``'s app that runs its requests on ``api``'s event loop, as one server does.

    A TestClient used outside ``with`` gives every request an event loop of its own and cancels what is left of it
    when the response is read: a job a request started (a desktop's reset at sign-out) would be cancelled half-way,
    and a cancelled task that waits on the app's loop hangs the test (seen in CI: a 300 s timeout)."""
    c = TestClient(api.app, **kw)
    c.portal = api.portal
    return c


@dataclass
class Env:
    api: TestClient
    driver: FakeDriver
    services: Services
    tmp: Path
    agent: Agent | None = None  # the host's agent (its state: what a host boot changes)

    def client(self, **kw: Any) -> TestClient:
        """Another client (a browser, an anonymous caller) of the same API: see ``client_of``."""
        return client_of(self.api, **kw)

    def wait(self, job: dict) -> dict:
        """Follow a job to its end and return its final record."""
        import time

        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            j = self.api.get(f"/v1/jobs/{job['id']}").json()
            if j["state"] in ("succeeded", "failed"):
                return j
            time.sleep(0.01)
        raise AssertionError(f"job {job['id']} did not finish")

    def create(self, name: str, **kw: object) -> dict:
        body = {"name": name, "image": "tiny", "vcpus": 1, "memory_mib": 128, **kw}
        r = self.api.post("/v1/vms", json=body)
        assert r.status_code == 202, r.text
        job = self.wait(r.json()["job"])
        assert job["state"] == "succeeded", job
        return self.api.get(f"/v1/vms/{name}").json()

    def act(self, name: str, action: str, **params: object) -> dict:
        r = self.api.post(f"/v1/vms/{name}/actions/{action}", params=params)
        assert r.status_code == 202, r.text
        return self.wait(r.json()["job"])

    def disk_files(self) -> list[Path]:
        return sorted((self.tmp / "disks").rglob("*.qcow2"))


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    images = tmp_path / "images"
    make_fake_image(images)
    driver = FakeDriver()
    agent = Agent(
        host="host1",
        driver=driver,
        disks=LocalDisks(tmp_path / "disks", images),
        accelerator="tcg",
        accelerator_reason="test",
        qemu_version="7.2",
        images=lambda: ["tiny"],
    )
    agent_client = AgentClient("host1", transport=httpx.ASGITransport(app=create_agent_app(agent)))
    holder: dict[str, Services] = {}

    async def factory() -> Services:
        svc = Services.build(SqliteStore(tmp_path / "state.db"), Agents({"host1": agent_client}), shutdown_timeout=2)
        holder["svc"] = svc
        return svc

    app = create_app(factory, TOKEN)
    with TestClient(app, headers={"Authorization": f"Bearer {TOKEN}"}) as api:
        yield Env(api, driver, holder["svc"], tmp_path, agent)


@dataclass
class Cluster:
    """Several hosts (each an agent with its own fake driver and disks) behind one API."""

    api: TestClient
    drivers: dict[str, FakeDriver]
    tmp: Path
    holder: dict[str, Services]

    @property
    def services(self) -> Services:
        return self.holder["svc"]

    def fail_host(self, host: str) -> None:
        """The host's lease expires: the control plane no longer counts it as up (its VMs stay in its driver)."""
        self.services.agents._up.discard(host)

    def wait_for(self, what: str, check: Any, timeout: float = 15) -> Any:
        import time

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = check()
            if value:
                return value
            time.sleep(0.05)
        raise AssertionError(f"timed out waiting for {what}")

    def wait(self, job: dict) -> dict:
        return Env.wait(self, job)  # type: ignore[arg-type]

    def create(self, name: str, **kw: object) -> dict:
        return Env.create(self, name, **kw)  # type: ignore[arg-type]

    def host_of(self, name: str) -> str:
        return str(self.api.get(f"/v1/vms/{name}").json()["host"])


def make_cluster(tmp_path: Path, hosts: list[str]) -> Iterator[Cluster]:
    images = tmp_path / "images"
    make_fake_image(images)
    shared = tmp_path / "shared"
    drivers: dict[str, FakeDriver] = {}
    clients = {}
    for i, host in enumerate(hosts, 1):
        drivers[host] = FakeDriver()
        agent = Agent(
            host=host, driver=drivers[host], disks=LocalDisks(tmp_path / host / "disks", images, shared),
            accelerator="tcg", accelerator_reason="test", qemu_version="7.2", images=lambda: ["tiny"],
            migration_address=f"10.0.0.{i}",
        )  # fmt: skip
        clients[host] = AgentClient(host, transport=httpx.ASGITransport(app=create_agent_app(agent)))

    holder: dict[str, Services] = {}

    async def factory() -> Services:
        svc = Services.build(
            SqliteStore(tmp_path / "state.db"),
            Agents(clients, records={h: {"disks_dir": str(tmp_path / h / "disks")} for h in hosts}),
            shutdown_timeout=2,
            ha=HaTimes(lease_ttl_s=6, fence_margin_s=0.2, heartbeat_timeout_s=5),
        )  # fmt: skip
        svc.vms.replication.retry_every_s = 0.5  # a lost replica is rebuilt at once, not 10 s after the last try
        holder["svc"] = svc
        return svc

    with TestClient(create_app(factory, TOKEN), headers={"Authorization": f"Bearer {TOKEN}"}) as api:
        yield Cluster(api, drivers, tmp_path, holder)


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    """Three hosts: h1, h2, h3."""
    yield from make_cluster(tmp_path, ["h1", "h2", "h3"])
