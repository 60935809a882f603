"""Parsing of /proc, /sys/class/net and QMP query-blockstats into resource figures; rates between samples."""

from __future__ import annotations

from pathlib import Path

import pytest

from kasou.control.metrics import host_point, vm_point
from kasou.hypervisor.qemu.stats import disk_id_of, parse_blockstats
from kasou.hypervisor.stats import (
    DiskIO,
    HostStats,
    VmStats,
    host_stats,
    parse_host_cpu,
    parse_loadavg,
    parse_meminfo,
    parse_pid_stat,
    read_net_counters,
    read_pid_stat,
)

# A real line of a QEMU process (fields past rss shortened); the name holds a space and a ")".
PID_STAT = (
    "4242 (qemu-system-x86) x) S 1 4241 4241 0 -1 4194560 52031 0 12 0 1234 566 0 0 20 0 5 0 "
    "998877 1234567890 51200 18446744073709551615 1 1 0 0 0 0 0 4096 17003 0 0 0 17 1 0 0 0 0 0"
)


def test_pid_stat_cpu_and_rss() -> None:
    cpu, rss = parse_pid_stat(PID_STAT, ticks=100, pagesize=4096)
    assert cpu == pytest.approx((1234 + 566) / 100)
    assert rss == 51200 * 4096


def test_pid_stat_of_this_process_and_a_missing_one() -> None:
    import os

    got = read_pid_stat(os.getpid())
    assert got is not None and got[0] >= 0 and got[1] > 1024 * 1024
    assert read_pid_stat(2**22 + 12345) is None
    with pytest.raises(ValueError):
        parse_pid_stat("garbage")


def test_host_cpu_loadavg_meminfo() -> None:
    text = "cpu  100 5 50 800 40 1 4 0 0 0\ncpu0 50 2 25 400 20 0 2 0 0 0\nintr 1\n"
    busy, total = parse_host_cpu(text, ticks=100)
    assert total == pytest.approx(1000 / 100) and busy == pytest.approx((1000 - 800 - 40) / 100)
    with pytest.raises(ValueError):
        parse_host_cpu("intr 1\n")
    assert parse_loadavg("0.52 0.31 0.20 1/123 4567\n") == (0.52, 0.31, 0.20)
    total_b, avail_b = parse_meminfo("MemTotal:  2048 kB\nMemFree:  100 kB\nMemAvailable:  1024 kB\n")
    assert (total_b, avail_b) == (2048 * 1024, 1024 * 1024)
    assert parse_meminfo("MemTotal:  2048 kB\nMemFree:  100 kB\n")[1] == 100 * 1024


def test_host_stats_from_a_fake_proc(tmp_path: Path) -> None:
    (tmp_path / "stat").write_text("cpu  10 0 10 80 0 0 0 0 0 0\n")
    (tmp_path / "loadavg").write_text("1.50 1.00 0.50 2/100 99\n")
    (tmp_path / "meminfo").write_text("MemTotal: 1000 kB\nMemAvailable: 250 kB\n")
    s = host_stats("h1", proc=tmp_path)
    assert s.name == "h1" and s.load_1m == 1.5 and s.memory_available_bytes == 250 * 1024
    assert s.cpu_total_seconds > s.cpu_busy_seconds > 0
    empty = host_stats("h2", proc=tmp_path / "none")  # nothing readable: zeros, no error
    assert empty.load_1m == 0 and empty.memory_total_bytes == 0


def test_net_counters(tmp_path: Path) -> None:
    st = tmp_path / "kt-abc" / "statistics"
    st.mkdir(parents=True)
    for k, v in {"rx_bytes": 10, "tx_bytes": 20, "rx_packets": 1, "tx_packets": 2}.items():
        (st / k).write_text(f"{v}\n")
    assert read_net_counters("kt-abc", sys_net=tmp_path) == {"rx_bytes": 10, "tx_bytes": 20, "rx_packets": 1,
                                                           "tx_packets": 2}  # fmt: skip
    assert read_net_counters("kt-none", sys_net=tmp_path) is None


BLOCKSTATS = [
    {"device": "", "qdev": "/machine/peripheral/disk0-dev/virtio-backend", "node-name": "disk0",
     "stats": {"rd_bytes": 4096, "wr_bytes": 512, "rd_operations": 2, "wr_operations": 1}},
    {"device": "", "qdev": "/machine/peripheral/data-dev/virtio-backend", "node-name": "mirror-top",
     "stats": {"rd_bytes": 1, "wr_bytes": 2, "rd_operations": 3, "wr_operations": 4}},
    {"device": "", "node-name": "repl-nbd-disk0", "stats": {"rd_bytes": 999}},  # a node with no guest device
]  # fmt: skip


def test_blockstats_by_disk_id() -> None:
    got = parse_blockstats(BLOCKSTATS)
    assert got == [
        DiskIO(id="data", read_bytes=1, write_bytes=2, read_ops=3, write_ops=4),
        DiskIO(id="disk0", read_bytes=4096, write_bytes=512, read_ops=2, write_ops=1),
    ]
    assert disk_id_of({"device": "ide0-hd0"}) == "ide0-hd0"
    assert disk_id_of({"qdev": "disk1-dev"}) == "disk1"
    assert parse_blockstats([]) == []


def test_rates_between_two_samples() -> None:
    a = VmStats(name="v", state="running", taken_at=100.0, cpu_seconds=10.0, rss_bytes=5,
                disks=[DiskIO(id="d", read_bytes=0, write_bytes=1000)])  # fmt: skip
    b = VmStats(name="v", state="running", taken_at=105.0, cpu_seconds=12.5, rss_bytes=7,
                disks=[DiskIO(id="d", read_bytes=500, write_bytes=6000)])  # fmt: skip
    assert vm_point(a, None) is None
    p = vm_point(b, a)
    assert p is not None and p.cpu_pct == 50.0 and p.rss_bytes == 7
    assert p.disk_read_bps == 100.0 and p.disk_write_bps == 1000.0 and p.net_rx_bps == 0
    restarted = b.model_copy(update={"cpu_seconds": 0.1, "taken_at": 110.0})
    assert vm_point(restarted, b) is None  # a new QEMU process: counters began again
    h0 = HostStats(
        taken_at=0, cpu_busy_seconds=10, cpu_total_seconds=100, memory_total_bytes=8, memory_available_bytes=2
    )
    h1 = h0.model_copy(update={"cpu_busy_seconds": 15, "cpu_total_seconds": 120, "load_1m": 0.7})
    hp = host_point(h1, h0)
    assert hp.cpu_pct == 25.0 and hp.memory_used_bytes == 6 and hp.load_1m == 0.7
    assert host_point(h0, None).cpu_pct == 0.0
