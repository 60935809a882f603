"""What the integration tests that drive real QEMU through QemuDriver share (not a test module).

A test builds its "hosts" (a QemuDriver, alone or behind its own agent app on an httpx ASGI
transport) under a short temporary directory, boots the tiny guest, whose writer prints one
``seq N`` line to the console for each write it has made durable, and at its end kills every
QEMU and qemu-storage-daemon whose command line names that directory, by pid.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self, TypeVar

import httpx
import pytest

from kasou.agent.app import Agent, create_agent_app
from kasou.agent.client import AgentClient
from kasou.agent.storage import LocalDisks
from kasou.hypervisor.base import LaunchDisk, LaunchSpec, RuntimeState
from kasou.hypervisor.qemu.driver import QemuDriver
from tests.integration.conftest import command_lines, pid_alive, remove_cgroups

DISK_SIZE = 64 * 1024 * 1024
T = TypeVar("T")


# -- the tiny guest and its writer -------------------------------------------------------------


def tiny_disk(images: Path) -> Path:
    """The tiny guest's raw disk in ``images``, which the ``tiny_image`` fixture has built: an image
    that does not load is an error of the test run, not a reason to skip."""
    from kasou.image import load_image

    return load_image(images, "tiny").disk


def need_storage_daemon() -> None:
    if shutil.which("qemu-storage-daemon") is None:
        pytest.skip("qemu-storage-daemon is not installed")


def scratch(prefix: str) -> Path:
    """A new directory under /tmp (short: unix socket paths)."""
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))


def qcow2_copy(image_disk: Path, path: Path, timeout: float | None = 60) -> Path:
    """A qcow2 copy of the tiny guest's raw disk at ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        ["qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", str(image_disk), str(path)],
        check=True,
        timeout=timeout,
    )
    return path


def tiny_spec(name: str, uuid: str, path: Path, **disk: Any) -> LaunchSpec:
    """The tiny guest (1 vCPU, 128 MiB) on one disk, ``disk0`` at ``path``."""
    return LaunchSpec(
        name=name,
        uuid=uuid,
        vcpus=1,
        memory_mib=128,
        image="tiny",
        disks=[LaunchDisk(id="disk0", path=str(path), **disk)],
    )


def console_log(log_dir: Path, vm: str) -> str:
    p = log_dir / f"{vm}.log"
    return p.read_text(errors="replace") if p.exists() else ""


def seqs(text: str) -> list[int]:
    """The writer's ``seq N`` lines in a console log."""
    out = []
    for ln in text.splitlines():
        parts = ln.split()
        if len(parts) == 2 and parts[0] == "seq" and parts[1].isdigit():
            out.append(int(parts[1]))
    return out


async def wait_for(what: str, cond: Callable[[], Awaitable[T | None]], timeout: float = 60.0) -> T:
    deadline = time.monotonic() + timeout
    while True:
        v = await cond()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        await asyncio.sleep(0.1)


# -- processes -------------------------------------------------------------------------------


def pids_under(root: Path, storage_daemons: bool = True) -> list[int]:
    """QEMU (and qemu-storage-daemon) processes, and the VMs' swtpm, whose command line names ``root``."""
    names = ("qemu-system", "qemu-storage-daemon") if storage_daemons else ("qemu-system",)
    return [
        pid
        for pid, args in command_lines()
        if args
        and (any(n in args[0] for n in names) or Path(args[0]).name == "swtpm")
        and any(str(root) in a for a in args)
    ]


def swtpm_pids(root: Path) -> list[int]:
    """The live swtpm processes whose command line names ``root``."""
    return [p for p, args in command_lines() if args and Path(args[0]).name == "swtpm" and pid_alive(p)
            and any(str(root) in a for a in args)]  # fmt: skip


async def end_processes(root: Path, storage_daemons: bool = True, check: bool = True) -> None:
    """Kill by pid what ``pids_under(root)`` finds and wait (10 s at most) for it to be gone;
    with ``check``, fail if something is left."""
    pids = pids_under(root, storage_daemons)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)  # a daemon a test stopped
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while any(pid_alive(x) for x in pids) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    # the drivers' runtime directories (ROOT/run, ROOT/x/run; a driver may have removed its own): their QEMUs' cgroups
    for run in [root / "run", *(d / "run" for d in (root.iterdir() if root.is_dir() else ()) if d.is_dir())]:
        remove_cgroups(run)
    if check:
        assert not any(pid_alive(x) for x in pids)


# -- hosts -----------------------------------------------------------------------------------


def make_driver(root: Path, images: Path, tls_dir: Path | None = None) -> QemuDriver:
    return QemuDriver(root / "run", root / "log", images, "tcg", tls_dir=tls_dir)


@dataclass
class AgentHost:
    """A QemuDriver behind its own agent app, with its files under ``root``; ``vm`` is the VM
    whose console log ``log`` and ``seqs`` read unless told another."""

    name: str
    root: Path
    driver: QemuDriver
    client: AgentClient
    vm: str

    @classmethod
    def make(cls, root: Path, name: str, images: Path, vm: str, tls_dir: Path | None = None) -> Self:
        driver = make_driver(root, images, tls_dir)
        agent = Agent(
            host=name,
            driver=driver,
            disks=LocalDisks(root / "disks", images),
            accelerator="tcg",
            accelerator_reason="test",
            qemu_version="7.2",
            images=lambda: ["tiny"],
            migration_address="127.0.0.1",
        )
        client = AgentClient(name, transport=httpx.ASGITransport(app=create_agent_app(agent)))
        return cls(name, root, driver, client, vm)

    @property
    def disks(self) -> Path:
        return self.root / "disks"

    def log(self, vm: str | None = None) -> str:
        return console_log(self.root / "log", vm or self.vm)

    def seqs(self, vm: str | None = None) -> list[int]:
        return seqs(self.log(vm))

    async def qmp(self, command: str, args: dict[str, Any] | None = None) -> Any:
        return await self.driver._qmp(self.driver._vms[self.vm], command, args)

    async def close(self) -> None:
        await self.driver.close()
        await self.client.close()


async def start_writing(h: AgentHost, spec: LaunchSpec, lines: int = 3, what: str | None = None) -> None:
    """Start the VM and wait until its guest is ready and has written ``lines`` lines."""
    await h.client.start(spec)

    async def writing() -> bool:
        return (await h.client.info(spec.name)).guest_ready and len(h.seqs(spec.name)) >= lines

    await wait_for(what or f"{spec.name} to write", writing, 90)


async def writes_go_on(h: AgentHost, more: int = 10, timeout: float = 30) -> None:
    """The VM runs on ``h`` and its guest writes ``more`` lines more."""
    n = (h.seqs() or [0])[-1]

    async def advanced() -> bool:
        info = await h.client.info(h.vm)
        assert info.state == RuntimeState.RUNNING, info
        return (h.seqs() or [0])[-1] >= n + more

    await wait_for(f"the guest on {h.name} to write {more} more lines", advanced, timeout)


@dataclass
class TwoHosts:
    """Hosts A and B under ``root``, for one VM (``a.vm``) with one disk of DISK_SIZE."""

    root: Path
    a: AgentHost
    b: AgentHost
    image_disk: Path
    uuid: str

    def spec(self, disk: Path) -> LaunchSpec:
        return tiny_spec(self.a.vm, self.uuid, disk, size_bytes=DISK_SIZE)


@contextlib.asynccontextmanager
async def serving(p: TwoHosts) -> AsyncIterator[None]:
    """A and B take up their VMs; at the end their agents close (those of the moment: a test may
    have restarted one), their processes are killed and ``p.root`` is removed."""
    await p.a.driver.attach_all()
    await p.b.driver.attach_all()
    try:
        yield
    finally:
        await p.a.close()
        await p.b.close()
        await end_processes(p.root)
        shutil.rmtree(p.root, ignore_errors=True)


async def boot_on_a(p: TwoHosts) -> Path:
    """The VM runs on A from its own disk and has written a few lines."""
    disk = qcow2_copy(p.image_disk, p.a.disks / p.a.vm / "disk0.qcow2")
    await p.a.client.start(p.spec(disk))

    async def writing() -> bool:
        info = await p.a.client.info(p.a.vm)
        assert info.state == RuntimeState.RUNNING, info
        return info.guest_ready and len(p.a.seqs()) >= 3

    await wait_for("the guest on A to write", writing, 90)
    return disk
