"""Wiring for the single-host services: the API server and the host agent, each run by uvicorn."""

from __future__ import annotations

import asyncio
import logging
import os

import uvicorn

from kasou.agent.app import Agent, create_agent_app
from kasou.agent.client import AgentClient
from kasou.agent.storage import LocalDisks
from kasou.api.app import Services, create_app
from kasou.api.auth import ensure_token
from kasou.config import Paths, api_listen, host_name
from kasou.control.vms import Agents
from kasou.hypervisor.qemu import accel
from kasou.hypervisor.qemu.driver import QemuDriver
from kasou.store.sqlite import SqliteStore


def _logging(paths: Paths, name: str) -> None:
    logging.basicConfig(
        level=logging.INFO,
        format=f"%(asctime)s {name} %(levelname)s %(name)s: %(message)s",
    )


def run_agent(paths: Paths, listen: str | None = None) -> None:
    """Run this host's agent in the foreground (``kasou agent``)."""
    paths.ensure()
    _logging(paths, "agent")
    decision = asyncio.run(accel.decide(paths.images))
    from kasou.image import KNOWN_IMAGES, load_image

    def images() -> list[str]:
        out = []
        for n in KNOWN_IMAGES:
            try:
                load_image(paths.images, n)
                out.append(n)
            except Exception:
                continue
        return out

    driver = QemuDriver(
        run_dir=paths.vm_run, serial_log_dir=paths.logs / "serial", images_dir=paths.images,
        accelerator=decision.accelerator,
    )  # fmt: skip
    agent = Agent(
        host=host_name(),
        driver=driver,
        disks=LocalDisks(paths.disks, paths.images),
        accelerator=decision.accelerator,
        accelerator_reason=decision.reason,
        qemu_version=decision.qemu_version,
        images=images,
    )
    app = create_agent_app(agent)
    if listen and not listen.startswith("unix:"):
        host, _, port = listen.rpartition(":")
        uvicorn.run(app, host=host or "127.0.0.1", port=int(port), log_level="warning")
        return
    sock = listen[len("unix:") :] if listen else str(paths.agent_socket)
    if os.path.exists(sock):
        os.unlink(sock)
    old = os.umask(0o077)  # the socket is root's only: its mode is the agent's authentication
    try:
        uvicorn.run(app, uds=sock, log_level="warning")
    finally:
        os.umask(old)


def run_api(paths: Paths, address: str | None = None) -> None:
    """Run the control plane and the REST API in the foreground (``kasou serve``)."""
    paths.ensure()
    _logging(paths, "api")
    token = ensure_token(paths.token_file)

    async def factory() -> Services:
        store = SqliteStore(paths.state_db)
        host = host_name()
        agents = Agents({host: AgentClient(host, uds=str(paths.agent_socket))})
        return Services.build(store, agents)

    host, port = api_listen(address)
    uvicorn.run(create_app(factory, token), host=host, port=port, log_level="warning")
