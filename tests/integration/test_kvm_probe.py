"""The KVM probe (kasou.hypervisor.qemu.accel.probe_kvm): a real QEMU under ``-accel kvm`` booting the tiny
guest. Whatever KVM does on this machine (here its guests hang), the probe ends within its timeout and leaves
no QEMU, no directory; and a process killed in the middle of its probe (SIGKILL: no finally runs) takes its
probe's QEMU with it."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kasou.hypervisor.qemu import accel
from tests.integration.conftest import command_lines, pid_alive

pytestmark = [pytest.mark.qemu, pytest.mark.shares_machine, pytest.mark.timeout(120)]


def probes(of_pid: int) -> list[int]:
    return [pid for pid, argv in command_lines() if f"guest=kasou-kvm-probe-{of_pid}," in " ".join(argv)]


def probe_dirs() -> set[Path]:
    return set(Path("/run").glob("kasou-kvm-probe-*"))


def test_the_probe_ends_in_time_and_leaves_nothing(tiny_image: Path) -> None:
    if not os.path.exists("/dev/kvm"):
        pytest.skip("no /dev/kvm: the probe is never started (TCG is chosen from the device's absence)")
    before = probe_dirs()
    t0 = time.monotonic()
    try:
        secs = asyncio.run(accel.probe_kvm(tiny_image, timeout=8))
        outcome = f"booted under KVM in {secs:.1f} s"
    except (TimeoutError, RuntimeError) as e:
        outcome = f"refused: {e}"
    took = time.monotonic() - t0
    print(f"probe: {outcome} ({took:.1f} s)")
    assert took < 8 + 15, outcome  # its timeout, then at most the kill's 10 s and the reaping
    assert probes(os.getpid()) == [] and probe_dirs() <= before


def test_a_process_killed_while_probing_takes_its_probe_with_it(tiny_image: Path) -> None:
    if not os.path.exists("/dev/kvm"):
        pytest.skip("no /dev/kvm: the probe is never started")
    before = probe_dirs()
    code = f"import asyncio; from pathlib import Path; from kasou.hypervisor.qemu import accel; " \
           f"asyncio.run(accel.probe_kvm(Path({str(tiny_image)!r}), timeout=60))"  # fmt: skip
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while not (found := probes(child.pid)):
            assert child.poll() is None, child.stderr.read().decode() if child.stderr else ""
            assert time.monotonic() < deadline, "the probe's QEMU did not start within 30 s"
            time.sleep(0.1)
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=10)
        deadline = time.monotonic() + 10
        while any(pid_alive(p) for p in found) and time.monotonic() < deadline:
            time.sleep(0.1)
        left = [p for p in found if pid_alive(p)]
        assert left == [], f"the probe's QEMU {left} outlived the process that started it"
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(timeout=10)
        for pid in probes(child.pid):
            os.kill(pid, signal.SIGKILL)
        for d in probe_dirs() - before:  # a probe killed with its process leaves its directory (in /run: tmpfs)
            shutil.rmtree(d, ignore_errors=True)
