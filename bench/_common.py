"""Shared plumbing for kasou's benchmarks: a private kasou environment and timing helpers.

Benchmarks are not tests: they print their figures (medians, ratios measured
side by side in one run) and clean up everything they started.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from kasou.api.auth import read_token
from kasou.api.client import Client
from kasou.config import DEFAULT_IMAGES, Paths

KASOU = [sys.executable, "-m", "kasou"]
READY = "KASOU-READY"


def images_dir() -> Path:
    return Path(os.environ.get("KASOU_IMAGES") or DEFAULT_IMAGES)


def ensure_image() -> None:
    subprocess.run([*KASOU, "image", "build", "tiny"], check=True, timeout=900)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_line(path: Path, text: str, timeout: float, poll: float = 0.005) -> float:
    """Block until ``text`` appears in the file; return the monotonic time it was seen."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if text in path.read_text(errors="replace"):
                return time.monotonic()
        except FileNotFoundError:
            pass
        time.sleep(poll)
    raise TimeoutError(f"{text!r} did not appear in {path} within {timeout:.0f} s")


def qemu_pids(mark: str) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                args = (d / "cmdline").read_bytes().decode(errors="replace")
            except OSError:
                continue
            if args.startswith("qemu-system") and mark in args:
                out.append(int(d.name))
    return out


def kill_pids(pids: list[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while any(Path(f"/proc/{p}").exists() for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


@contextlib.contextmanager
def kasou_env() -> Iterator[tuple[Paths, Client, dict[str, str]]]:
    """A private kasou (own home, own port) that is torn down with all its VMs."""
    home = Path(tempfile.mkdtemp(prefix="kasou-b-", dir="/tmp"))
    api = f"127.0.0.1:{free_port()}"
    env = dict(os.environ, KASOU_HOME=str(home), KASOU_API=api, KASOU_IMAGES=str(images_dir()))
    paths = Paths.from_env(home)
    try:
        subprocess.run([*KASOU, "up"], env=env, check=True, timeout=120, capture_output=True)
        client = Client("http://" + api, read_token(paths.token_file), timeout=120)
        yield paths, client, env
    finally:
        subprocess.run([*KASOU, "down"], env=env, timeout=60, capture_output=True)
        kill_pids(qemu_pids(str(home)) + qemu_pids(str(paths.vm_run)))
        shutil.rmtree(paths.vm_run, ignore_errors=True)
        shutil.rmtree(home, ignore_errors=True)


def follow(api: Any, job: dict[str, Any], timeout: float) -> None:
    """Wait for a job (through an httpx client of the API) to succeed; exit with its error if it fails."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        j = api.get(f"/v1/jobs/{job['id']}").json()
        if j["state"] == "succeeded":
            return
        if j["state"] == "failed":
            raise SystemExit(f"job failed: {j.get('error')}")
        time.sleep(0.3)
    raise SystemExit("a job did not finish")


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def interleave(n: int, runners: dict[str, Callable[[int], float]]) -> dict[str, list[float]]:
    """Run each runner n times, rotating the order every round so drift hits all alike."""
    names = list(runners)
    out: dict[str, list[float]] = {k: [] for k in names}
    for i in range(n):
        order = names[i % len(names) :] + names[: i % len(names)]
        for name in order:
            out[name].append(runners[name](i))
    return out


def lab_env(env: dict[str, str], host: str) -> dict[str, str]:
    """``env`` plus what ``kasou lab env HOST`` exports (the host's API address and the lab token)."""
    out = subprocess.run([*KASOU, "lab", "env", host], env=env, capture_output=True, text=True, check=True).stdout
    merged = dict(env)
    for line in out.splitlines():
        k, _, v = line.removeprefix("export ").partition("=")
        merged[k.strip()] = v.strip().strip("'\"")
    return merged
