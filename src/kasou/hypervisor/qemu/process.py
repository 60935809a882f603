"""Facts about host processes from /proc, and bounded ways to end them."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import signal
import time
from pathlib import Path

_CLK_TCK = os.sysconf("SC_CLK_TCK")


def _stat_fields(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # The command name is in parentheses and may contain spaces: split after it.
    tail = raw.rsplit(")", 1)[1].split()
    return tail  # tail[0] is the state, tail[19] is starttime


def alive(pid: int | None) -> bool:
    """True if ``pid`` is a live process (a zombie counts as dead)."""
    if not pid or pid <= 0:
        return False
    fields = _stat_fields(pid)
    return fields is not None and fields[0] not in ("Z", "X")


def cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return []
    return [a.decode(errors="replace") for a in raw.split(b"\0") if a]


def is_guest(pid: int | None, name: str) -> bool:
    """True if ``pid`` is a live QEMU process of the VM ``name`` (guards against pid reuse)."""
    if not alive(pid):
        return False
    assert pid is not None
    args = cmdline(pid)
    return any(a == f"guest={name}" or a.startswith(f"guest={name},") for a in args)


def _boot_time() -> float:
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith("btime "):
            return float(line.split()[1])
    return 0.0


def started_at(pid: int) -> float | None:
    """Epoch time the process started (exact across agent restarts)."""
    fields = _stat_fields(pid)
    if fields is None:
        return None
    return _boot_time() + int(fields[19]) / _CLK_TCK


def rss_bytes(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except (FileNotFoundError, ProcessLookupError):
        pass
    return 0


async def wait_gone(pid: int, timeout: float) -> bool:
    """Wait until ``pid`` is gone; False if it still runs after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while alive(pid):
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(0.05)
    return True


async def kill_hard(pid: int, timeout: float = 10.0) -> bool:
    """SIGTERM, then SIGKILL after half the timeout. True once the process is gone."""
    for sig, share in ((signal.SIGTERM, 0.5), (signal.SIGKILL, 0.5)):
        if not alive(pid):
            return True
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return True
        if await wait_gone(pid, timeout * share):
            return True
    return not alive(pid)


_PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """For ``preexec_fn``, in the child before exec: the kernel sends it SIGKILL when the process that started
    it dies (PR_SET_PDEATHSIG), so a helper (a KVM probe, qemu-img, virt-v2v) never outlives the agent."""
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
