"""What a host offers: CPUs, memory, load; read from /proc."""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import BaseModel


class HostInfo(BaseModel):
    name: str
    cpus: int
    memory_total_mib: int
    memory_available_mib: int
    load_1m: float
    accelerator: str
    accelerator_reason: str
    qemu_version: str
    agent_version: str
    vms_running: int = 0
    #: This run of the agent (new at each start), and whether it found no VM running when it started:
    #: the host booted (or kasou was started after ``kasou down --vms``); its onboot VMs start then.
    agent_run: str = ""
    started_empty: bool = False


def meminfo() -> dict[str, int]:
    """/proc/meminfo in KiB."""
    out = {}
    for line in Path("/proc/meminfo").read_text().splitlines():
        key, _, rest = line.partition(":")
        parts = rest.split()
        if parts and parts[0].isdigit():
            out[key] = int(parts[0])
    return out


def memory_mib() -> tuple[int, int]:
    m = meminfo()
    return m.get("MemTotal", 0) // 1024, m.get("MemAvailable", m.get("MemFree", 0)) // 1024


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def load_1m() -> float:
    try:
        return os.getloadavg()[0]
    except OSError:
        return 0.0
