"""Resource figures of running VMs and of their host: the models, and the Linux ``/proc`` parsing behind them.

Every figure is a counter since the process (or the host) started, or a gauge of
now; rates (CPU %, bytes/s) are worked out by whoever keeps two samples
(:mod:`kasou.control.metrics`, or Prometheus from the ``/metrics`` counters).

* CPU: ``utime + stime`` of the QEMU process in ``/proc/<pid>/stat`` (all vCPU
  threads and QEMU's own work), in seconds;
* memory: the QEMU process's resident set (``/proc/<pid>/stat`` field 24, in pages);
* disks: QMP ``query-blockstats`` per virtual disk (bytes and operations read and written);
* network: the tap device's counters in ``/sys/class/net/<tap>/statistics`` for a NIC on a
  named network; a NIC on QEMU's user networking (slirp) has no host device, and QEMU 7.2
  has no QMP command for a netdev's counters, so its traffic is not counted.
"""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

from pydantic import BaseModel, Field

USER_NET_NOTE = "QEMU user networking (slirp) has no host device and QEMU reports no counters for it: not counted"


class DiskIO(BaseModel):
    id: str
    read_bytes: int = 0
    write_bytes: int = 0
    read_ops: int = 0
    write_ops: int = 0


class NicIO(BaseModel):
    id: str
    device: str | None = None  # the tap on the host; None for user networking
    counted: bool = True  # False: no counters exist for this NIC (user networking)
    rx_bytes: int = 0  # as the host sees the tap: rx is what the guest sent
    tx_bytes: int = 0
    rx_packets: int = 0
    tx_packets: int = 0


class VmStats(BaseModel):
    """One running VM's figures at ``taken_at`` (counters since its QEMU started)."""

    name: str
    state: str
    taken_at: float = Field(default_factory=time.time)
    cpu_seconds: float = 0.0  # user + system time of the QEMU process
    rss_bytes: int = 0
    disks: list[DiskIO] = []
    nics: list[NicIO] = []
    note: str | None = None  # what could not be measured, and why

    @property
    def disk_read_bytes(self) -> int:
        return sum(d.read_bytes for d in self.disks)

    @property
    def disk_write_bytes(self) -> int:
        return sum(d.write_bytes for d in self.disks)

    @property
    def net_rx_bytes(self) -> int:
        return sum(n.rx_bytes for n in self.nics)

    @property
    def net_tx_bytes(self) -> int:
        return sum(n.tx_bytes for n in self.nics)


class HostStats(BaseModel):
    """A host's figures at ``taken_at``: CPU time since boot (all CPUs), load, memory."""

    name: str = ""
    taken_at: float = Field(default_factory=time.time)
    cpus: int = 1
    cpu_busy_seconds: float = 0.0  # every CPU's non-idle time summed
    cpu_total_seconds: float = 0.0  # every CPU's time summed (busy + idle + iowait)
    load_1m: float = 0.0
    load_5m: float = 0.0
    load_15m: float = 0.0
    memory_total_bytes: int = 0
    memory_available_bytes: int = 0


class StatsReport(BaseModel):
    """The agent's ``GET /agent/v1/stats``: the host and every VM running there."""

    host: HostStats
    vms: list[VmStats] = []


def clock_ticks() -> int:
    try:
        return int(os.sysconf("SC_CLK_TCK"))
    except (ValueError, OSError):
        return 100


def page_size() -> int:
    try:
        return int(os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError):
        return 4096


def parse_pid_stat(text: str, ticks: int | None = None, pagesize: int | None = None) -> tuple[float, int]:
    """``/proc/<pid>/stat`` -> (CPU seconds user + system, resident bytes).

    The command name (field 2) is in parentheses and may hold spaces and ``)``: the
    fields are counted from the last ``)``.
    """
    ticks = ticks or clock_ticks()
    pagesize = pagesize or page_size()
    end = text.rfind(")")
    if end < 0:
        raise ValueError("not a /proc/<pid>/stat line")
    rest = text[end + 2 :].split()
    # rest[0] is field 3 (state); utime is field 14, stime 15, rss 24.
    utime, stime, rss = int(rest[11]), int(rest[12]), int(rest[21])
    return (utime + stime) / ticks, rss * pagesize


def read_pid_stat(pid: int) -> tuple[float, int] | None:
    try:
        return parse_pid_stat(Path(f"/proc/{pid}/stat").read_text())
    except (OSError, ValueError, IndexError):
        return None


def parse_host_cpu(text: str, ticks: int | None = None) -> tuple[float, float]:
    """``/proc/stat`` -> (busy seconds, total seconds) of all CPUs together (the ``cpu`` line)."""
    ticks = ticks or clock_ticks()
    for line in text.splitlines():
        parts = line.split()
        if parts and parts[0] == "cpu":
            vals = [int(x) for x in parts[1:]]
            # user nice system idle iowait irq softirq steal guest guest_nice; guest time is already in user.
            total = sum(vals[:8])
            idle = vals[3] + (vals[4] if len(vals) > 4 else 0)
            return (total - idle) / ticks, total / ticks
    raise ValueError("no cpu line in /proc/stat")


def parse_loadavg(text: str) -> tuple[float, float, float]:
    a, b, c = text.split()[:3]
    return float(a), float(b), float(c)


def parse_meminfo(text: str) -> tuple[int, int]:
    """``/proc/meminfo`` -> (total bytes, available bytes)."""
    kib: dict[str, int] = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        parts = rest.split()
        if parts and parts[0].isdigit():
            kib[key] = int(parts[0])
    return kib.get("MemTotal", 0) * 1024, kib.get("MemAvailable", kib.get("MemFree", 0)) * 1024


def host_stats(name: str = "", proc: Path = Path("/proc")) -> HostStats:
    """This host's figures from ``/proc`` (zeros for what cannot be read)."""
    s = HostStats(name=name, cpus=len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1)
    with contextlib.suppress(OSError, ValueError):
        s.cpu_busy_seconds, s.cpu_total_seconds = parse_host_cpu((proc / "stat").read_text())
    with contextlib.suppress(OSError, ValueError):
        s.load_1m, s.load_5m, s.load_15m = parse_loadavg((proc / "loadavg").read_text())
    with contextlib.suppress(OSError):
        s.memory_total_bytes, s.memory_available_bytes = parse_meminfo((proc / "meminfo").read_text())
    return s


def read_net_counters(device: str, sys_net: Path = Path("/sys/class/net")) -> dict[str, int] | None:
    """rx/tx bytes and packets of a network device (None if it is not there)."""
    base = sys_net / device / "statistics"
    out = {}
    try:
        for key in ("rx_bytes", "tx_bytes", "rx_packets", "tx_packets"):
            out[key] = int((base / key).read_text().strip())
    except (OSError, ValueError):
        return None
    return out
