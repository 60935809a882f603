"""Devices that change on a real tiny guest, through the kasou CLI, the API and the agent (QEMU confined as it is
by default): a disk hot-added, grown online and hot-removed, a NIC hot-added and removed, new vCPUs and memory
at the next start. One VM, two boots."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from tests.integration.conftest import Kasou, qemu_pids_of

pytestmark = [
    pytest.mark.qemu,
    pytest.mark.shares_machine,
]  # beside the fast tests (scripts/test.sh): tiny guests, no timing

MIB = 1024 * 1024


def _open_files(pid: int) -> set[str]:
    out = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            out.add(os.readlink(fd))
    return out


def _virtual_size(path: str) -> int:
    r = subprocess.run(["qemu-img", "info", "-U", "--output=json", path], capture_output=True, check=True, timeout=30)
    return int(json.loads(r.stdout)["virtual-size"])


def _qemu(kasou: Kasou) -> int:
    (pid,) = [p for p in qemu_pids_of(kasou.home) if "qemu-system" in Path(f"/proc/{p}/exe").resolve().name]
    return pid


def _timed(kasou: Kasou, *args: str) -> subprocess.CompletedProcess[str]:
    """Run a kasou command and print how long it took (the CLI's start, the API, the job, the agent, QEMU)."""
    t0 = time.monotonic()
    r = kasou.run(*args)
    print(f"kasou {' '.join(args)}: {time.monotonic() - t0:.2f} s")
    return r


def test_hot_plug_a_disk_and_a_nic_and_new_sizes_at_the_next_start(kasou: Kasou) -> None:
    kasou.run("vm", "create", "dev1", "--image", "tiny", "--disk", "256M", "--disk", "16M", "--start")
    kasou.wait_ready("dev1")
    kasou.wait_for("seq lines", lambda: len(kasou.seqs("dev1")) >= 3)
    pid = _qemu(kasou)
    vm = kasou.vm("dev1")
    assert [(d["id"], d["port"]) for d in vm["disks"]] == [("disk0", None), ("disk1", 1)]
    assert vm["disks"][1]["path"] in _open_files(pid)  # made at creation, on a hot-plug port

    # A disk hot-added: QEMU (its own uid: confined) has the new file open, which is that uid's.
    r = _timed(kasou, "disk", "add", "dev1", "--size", "32M")
    assert "disk disk2 added, 32M (hot-plugged" in r.stdout, r.stdout
    d2 = kasou.vm("dev1")["disks"][2]
    assert d2["port"] == 2 and d2["path"] in _open_files(pid)
    assert os.stat(d2["path"]).st_uid == os.stat(f"/proc/{pid}").st_uid

    # Grown online, then refused smaller.
    r = _timed(kasou, "disk", "resize", "dev1", "disk2", "64M")
    assert "disk disk2 is 64 MiB (online" in r.stdout, r.stdout
    assert _virtual_size(d2["path"]) == 64 * MIB
    r = kasou.run("disk", "resize", "dev1", "disk2", "32M", check=False)
    assert r.returncode == 2 and "a disk only grows" in r.stderr and len(r.stderr.strip().splitlines()) == 1

    # A NIC hot-added with a MAC of its own.
    r = _timed(kasou, "nic", "add", "dev1", "--network", "user")
    assert "NIC net1 on user" in r.stdout and "hot-plugged" in r.stdout, r.stdout

    # Both come out again while the guest runs on; the disk's file goes.
    _timed(kasou, "disk", "remove", "dev1", "disk2")
    assert not Path(d2["path"]).exists() and d2["path"] not in _open_files(pid)
    _timed(kasou, "nic", "remove", "dev1", "net1")
    assert [n["id"] for n in kasou.vm("dev1")["nics"]] == ["net0"]
    r = kasou.run("disk", "remove", "dev1", "disk0", check=False)
    assert r.returncode == 4 and "boot disk" in r.stderr  # a conflict
    n = kasou.seqs("dev1")[-1]
    kasou.wait_for("the guest to write on", lambda: kasou.seqs("dev1")[-1] >= n + 3)

    # New sizes: at the next start.
    r = kasou.run("vm", "set", "dev1", "--memory", "192")
    assert "192 MiB at its next start" in r.stdout, r.stdout
    assert kasou.vm("dev1")["memory_mib"] == 128
    kasou.run("vm", "stop", "dev1")
    kasou.run("vm", "start", "dev1")
    kasou.wait_ready("dev1")
    assert kasou.vm("dev1")["memory_mib"] == 192 and kasou.vm("dev1")["next_start"] == {}
    args = Path(f"/proc/{_qemu(kasou)}/cmdline").read_bytes().split(b"\0")
    assert args[args.index(b"-m") + 1] == b"192"
    kasou.run("vm", "stop", "dev1")
