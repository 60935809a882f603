"""A lab an earlier run left on the machine is taken down before a lab test, not a reason to skip.

Two leftovers: a real 1-host lab (``kasou lab up`` in a directory under /tmp, then forgotten, as
a killed test run leaves it) and links and a namespace no recorded lab claims, with a process in
the namespace. ``end_leftover_labs`` removes both; nothing of them may remain.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

import pytest

from kasou.lab import net
from tests.integration.conftest import KASOU, end_leftover_labs, lab_leftovers, pid_alive

pytestmark = [pytest.mark.qemu, pytest.mark.etcd, pytest.mark.timeout(300)]


@pytest.fixture
def clean_machine() -> None:
    if os.geteuid() != 0:
        pytest.skip("labs need root")
    end_leftover_labs()  # one a failed earlier run of this very test left


def test_a_recorded_lab_left_behind_is_taken_down_with_lab_down(clean_machine: None) -> None:
    base = Path(tempfile.mkdtemp(prefix="kasou-lab-left-", dir="/tmp"))
    env = dict(os.environ, KASOU_LAB_DIR=str(base))
    for k in ("KASOU_TOKEN", "KASOU_API", "KASOU_HOME"):
        env.pop(k, None)
    try:
        subprocess.run([*KASOU, "lab", "up", "--hosts", "1"], env=env, check=True, capture_output=True, timeout=180)
        pids = [int(p) for p in net.pids_in_netns("klab-h1")]
        assert pids and lab_leftovers()
        done = end_leftover_labs()
        assert any(line.startswith(f"lab down in {base}") for line in done), done
        assert lab_leftovers() == []
        assert not any(pid_alive(p) for p in pids)
        assert not base.exists()  # lab down removes its directory
    finally:
        subprocess.run([*KASOU, "lab", "down"], env=env, capture_output=True, timeout=120)
        shutil.rmtree(base, ignore_errors=True)


def test_unrecorded_links_and_namespaces_are_removed_and_their_processes_killed(clean_machine: None) -> None:
    proc = None
    try:
        subprocess.run(["ip", "link", "add", "klab0", "type", "bridge"], check=True, timeout=10)
        subprocess.run(["ip", "netns", "add", "klab-h7"], check=True, timeout=10)
        subprocess.run(
            ["ip", "link", "add", "klab-h7", "type", "veth", "peer", "name", "uplink"], check=True, timeout=10
        )
        subprocess.run(["ip", "link", "set", "uplink", "netns", "klab-h7"], check=True, timeout=10)
        proc = subprocess.Popen(["ip", "netns", "exec", "klab-h7", "sleep", "300"], start_new_session=True)
        assert set(lab_leftovers()) == {"klab0", "klab-h7", "netns klab-h7"}
        done = end_leftover_labs()
        assert lab_leftovers() == [], done
        assert proc.wait(timeout=10) == -signal.SIGKILL
    finally:
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        for link in ("klab0", "klab-h7"):
            subprocess.run(["ip", "link", "del", link], capture_output=True, timeout=10)
        subprocess.run(["ip", "netns", "del", "klab-h7"], capture_output=True, timeout=10)
