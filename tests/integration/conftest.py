"""Real kasou on real QEMU: each test gets its own KASOU_HOME, API port and services.

Every test ends every process it started, by pid (services, and any QEMU whose
command line names the test's home), and removes its files.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from kasou.config import DEFAULT_IMAGES, Paths

KASOU = [sys.executable, "-m", "kasou"]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "integration" in str(item.fspath) and item.get_closest_marker("etcd") is None:
            item.add_marker(pytest.mark.qemu)


@pytest.fixture(scope="session")
def tiny_image() -> Path:
    if os.geteuid() != 0:
        pytest.skip("real-QEMU tests run as root")
    images = Path(os.environ.get("KASOU_IMAGES") or DEFAULT_IMAGES)
    r = subprocess.run([*KASOU, "image", "build", "tiny"], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr
    return images


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def command_lines() -> Iterator[tuple[int, list[str]]]:
    """Each process's pid and command line (read from /proc; those gone meanwhile are passed over)."""
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            args = (d / "cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        yield int(d.name), args


def qemu_pids_of(home: Path) -> list[int]:
    """QEMU processes started for this home (their command lines name its paths)."""
    paths = Paths.from_env(home)
    marks = (str(home), str(paths.vm_run))
    return [
        pid
        for pid, args in command_lines()
        if args and "qemu-system" in args[0] and any(m in a for a in args for m in marks)
    ]


def pid_alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


@dataclass
class Kasou:
    """One kasou environment driven through its CLI, as a hospital's script would."""

    home: Path
    api: str
    env: dict[str, str] = field(default_factory=dict)
    pools: Path = Path("/nonexistent")  # its storage root (KASOU_STORAGE_ROOTS): pools go there, not in the home

    @property
    def paths(self) -> Paths:
        return Paths.from_env(self.home)

    def run(self, *args: str, check: bool = True, timeout: float = 180) -> subprocess.CompletedProcess[str]:
        r = subprocess.run([*KASOU, *args], env=self.env, capture_output=True, text=True, timeout=timeout)
        if check and r.returncode != 0:
            raise AssertionError(f"kasou {' '.join(args)} failed ({r.returncode}): {r.stderr.strip()}")
        return r

    def json(self, *args: str) -> Any:
        return json.loads(self.run(*args, "--json").stdout)

    def vm(self, name: str) -> dict[str, Any]:
        return dict(self.json("vm", "show", name))

    def wait_for(self, what: str, cond: Callable[[], Any], timeout: float = 90, every: float = 0.3) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            v = cond()
            if v:
                return v
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
            time.sleep(every)

    def wait_ready(self, name: str, timeout: float = 90) -> dict[str, Any]:
        return dict(self.wait_for(f"{name} guest ready", lambda: (v := self.vm(name))["guest_ready"] and v, timeout))

    def log(self, name: str) -> str:
        return self.run("vm", "log", name).stdout

    def seqs(self, name: str) -> list[int]:
        return [int(ln.split()[1]) for ln in self.log(name).splitlines() if ln.startswith("seq ")]

    def service_pid(self, service: str) -> int:
        return int(self.paths.pidfile(service).read_text())


@pytest.fixture
def kasou(tiny_image: Path) -> Iterator[Kasou]:
    home = Path(tempfile.mkdtemp(prefix="kasou-t-", dir="/tmp"))
    pools = Path(tempfile.mkdtemp(prefix="kasou-pools-", dir="/tmp"))
    api = f"127.0.0.1:{free_port()}"
    env = dict(os.environ, KASOU_HOME=str(home), KASOU_API=api, KASOU_IMAGES=str(tiny_image),
               KASOU_STORAGE_ROOTS=str(pools))  # fmt: skip
    env.pop("KASOU_TOKEN", None)
    k = Kasou(home, api, env, pools)
    try:
        k.run("up", timeout=120)
        yield k
    finally:
        subprocess.run([*KASOU, "down"], env=env, capture_output=True, timeout=60)
        for svc in ("api", "agent"):
            try:
                pid = int(k.paths.pidfile(svc).read_text())
                os.kill(pid, signal.SIGKILL)
            except (OSError, ValueError):
                pass
        for pid in qemu_pids_of(home):
            os.kill(pid, signal.SIGKILL)
        for pid in qemu_pids_of(home):
            deadline = time.monotonic() + 10
            while pid_alive(pid) and time.monotonic() < deadline:
                time.sleep(0.05)
        shutil.rmtree(k.paths.vm_run, ignore_errors=True)
        shutil.rmtree(home, ignore_errors=True)
        shutil.rmtree(pools, ignore_errors=True)
