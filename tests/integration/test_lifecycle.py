"""Real tiny guests under QEMU, driven through the kasou CLI and API."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.integration.conftest import Kasou, pid_alive, qemu_pids_of

pytestmark = pytest.mark.qemu


def test_full_lifecycle(kasou: Kasou) -> None:
    kasou.run(
        "vm",
        "create",
        "emr1",
        "--image",
        "tiny",
        "--vcpus",
        "1",
        "--memory",
        "128",
        "--disk",
        "256M",
        "--start",
    )
    vm = kasou.wait_ready("emr1")
    for key in ("name", "state", "host", "vcpus", "memory_mib", "disks", "guest_ready", "uptime_s"):
        assert key in vm
    assert vm["state"] == "running"
    assert vm["disks"][0]["size_bytes"] == 256 * 1024 * 1024
    assert vm["uptime_s"] is not None and vm["uptime_s"] > 0
    [pid] = qemu_pids_of(kasou.home)
    args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    assert b"guest=emr1,debug-threads=on" in args

    # The writer acknowledges writes on the console; uptime comes from the guest.
    kasou.wait_for("seq lines", lambda: len(kasou.seqs("emr1")) >= 5)
    assert "recovered 0" in kasou.log("emr1")
    listed = kasou.json("vm", "list")
    assert [v["name"] for v in listed] == ["emr1"]
    assert set(listed[0]) == set(vm)

    kasou.run("vm", "pause", "emr1")
    assert kasou.vm("emr1")["state"] == "paused"
    n = len(kasou.seqs("emr1"))
    time.sleep(1.0)
    assert len(kasou.seqs("emr1")) <= n + 1  # a paused guest writes nothing
    kasou.run("vm", "resume", "emr1")
    assert kasou.vm("emr1")["state"] == "running"

    # Graceful shutdown: the guest powers off by itself, well before the hard-stop timeout.
    last = kasou.seqs("emr1")[-1]
    t0 = time.monotonic()
    kasou.run("vm", "shutdown", "emr1", "--timeout", "60")
    print(f"\n[tiny guest] vm shutdown took {time.monotonic() - t0:.2f} s")
    assert time.monotonic() - t0 < 30
    assert kasou.vm("emr1")["state"] == "stopped"
    assert not pid_alive(pid)
    history = kasou.json("vm", "history", "emr1")
    assert history[-1]["event"] == "stopped"
    assert history[-1]["detail"] == "graceful shutdown (with the ACPI power button)"  # the tiny guest has no agent
    last = kasou.seqs("emr1")[-1]

    # Start again: the guest finds every acknowledged write on its disk.
    kasou.run("vm", "start", "emr1")
    kasou.wait_ready("emr1")
    log = kasou.wait_for(
        "recovered line", lambda: [ln for ln in kasou.log("emr1").splitlines() if ln.startswith("recovered")]
    )
    assert int(log[0].split()[1]) >= last

    kasou.run("vm", "reboot", "emr1")
    kasou.run("vm", "stop", "emr1")
    assert qemu_pids_of(kasou.home) == []
    events = [e["event"] for e in kasou.json("vm", "history", "emr1")]
    assert events == ["defined", "started", "paused", "resumed", "stopped", "started", "restarted", "stopped"]

    kasou.run("vm", "delete", "emr1")
    assert kasou.json("vm", "list") == []
    assert not any(kasou.paths.disks.rglob("*.qcow2"))


def test_vms_survive_kill_9_of_agent_and_api(kasou: Kasou) -> None:
    kasou.run("vm", "create", "pacs1", "--image", "tiny", "--start")
    kasou.run("vm", "create", "lab1", "--image", "tiny", "--start")
    before = {n: kasou.wait_ready(n) for n in ("pacs1", "lab1")}
    pids = sorted(qemu_pids_of(kasou.home))
    assert len(pids) == 2

    os.kill(kasou.service_pid("agent"), signal.SIGKILL)
    os.kill(kasou.service_pid("api"), signal.SIGKILL)
    time.sleep(1.0)
    assert all(pid_alive(p) for p in pids), "killing kasou's services must never stop a VM"
    # While the agent is away, one QEMU dies.
    lab_pid = next(p for p in pids if b"guest=lab1" in Path(f"/proc/{p}/cmdline").read_bytes())
    os.kill(lab_pid, signal.SIGKILL)

    kasou.run("up", timeout=120)
    pacs = kasou.wait_ready("pacs1")
    assert pacs["state"] == "running"
    assert pacs["started_at"] == pytest.approx(before["pacs1"]["started_at"], abs=0.05)
    assert pacs["uptime_s"] >= before["pacs1"]["uptime_s"]
    assert sorted(qemu_pids_of(kasou.home)) == [p for p in pids if p != lab_pid]
    lab = kasou.vm("lab1")
    assert lab["state"] == "crashed"
    assert kasou.json("vm", "history", "lab1")[-1]["event"] == "crashed"
    # The survivor is still fully controllable.
    kasou.run("vm", "stop", "pacs1")
    kasou.run("vm", "start", "lab1")
    kasou.wait_ready("lab1")


def test_up_and_down_are_idempotent_and_down_leaves_vms(kasou: Kasou) -> None:
    r = kasou.run("up")
    assert "already running" in r.stdout
    kasou.run("vm", "create", "nutri", "--image", "tiny", "--start")
    kasou.wait_ready("nutri")
    pids = qemu_pids_of(kasou.home)
    kasou.run("down")
    assert "not running" in kasou.run("down").stdout
    assert all(pid_alive(p) for p in pids)
    kasou.run("up")
    assert kasou.wait_ready("nutri")["state"] == "running"
    r = kasou.run("down", "--vms", timeout=240)
    assert "shutdown: 1 succeeded, 0 failed" in r.stdout  # gracefully, as one bulk job
    assert qemu_pids_of(kasou.home) == []


def test_linked_clone(kasou: Kasou) -> None:
    kasou.run("vm", "create", "gold", "--image", "tiny", "--disk", "128M")
    kasou.run("vm", "template", "gold")
    kasou.run("vm", "create", "desk1", "--from", "gold", "--start")
    vm = kasou.wait_ready("desk1")
    assert vm["template"] == "gold"
    disk = vm["disks"][0]
    assert disk["linked"]
    info = json.loads(
        subprocess.run(
            ["qemu-img", "info", "-U", "--output=json", disk["path"]], capture_output=True, check=True
        ).stdout
    )
    gold_disk = kasou.vm("gold")["disks"][0]["path"]
    assert info["full-backing-filename"] == gold_disk
    assert info["actual-size"] < 16 * 1024 * 1024  # thin: only what the clone wrote
    r = kasou.run("vm", "delete", "gold", check=False)
    assert r.returncode == 4 and "linked clones: desk1" in r.stderr  # a conflict
    kasou.run("vm", "delete", "desk1", "--force")
    kasou.run("vm", "delete", "gold")
    assert qemu_pids_of(kasou.home) == []


def test_failures_leave_nothing_behind(kasou: Kasou) -> None:
    # Bad input: one line, exit 2 (usage, docs/cli.md) or 3 (not found), nothing created.
    for code, args in (
        (2, ["vm", "create", "a b", "--image", "tiny"]),
        (2, ["vm", "create", "../x", "--image", "tiny"]),
        (2, ["vm", "create", "ok", "--image", "tiny", "--vcpus", "0"]),
        (2, ["vm", "create", "ok", "--image", "tiny", "--vcpus", "two"]),
        (2, ["vm", "create", "ok", "--image", "tiny", "--memory", "-5"]),
        (2, ["vm", "create", "ok", "--image", "tiny", "--memory", "99999999"]),
        (2, ["vm", "create", "ok", "--image", "tiny", "--disk", "huge"]),
        (2, ["vm", "create", "ok", "--image", "nosuch"]),
        (3, ["vm", "start", "nosuch"]),
    ):
        r = kasou.run(*args, check=False)
        assert r.returncode == code, (args, r.returncode, r.stderr)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), (args, r.stderr)
    assert kasou.json("vm", "list") == []
    assert not any(kasou.paths.disks.rglob("*"))

    # QEMU refuses to start (a damaged disk): the VM stays stopped, no process is left.
    kasou.run("vm", "create", "rx", "--image", "tiny")
    disk = Path(kasou.vm("rx")["disks"][0]["path"])
    disk.write_bytes(b"this is not a qcow2 image" * 100)
    r = kasou.run("vm", "start", "rx", check=False)
    assert r.returncode == 1
    assert "QEMU refused to start VM 'rx'" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert kasou.vm("rx")["state"] == "stopped"
    assert qemu_pids_of(kasou.home) == []
    assert not any(kasou.paths.vm_run.glob("rx/*"))

    # Starting a running VM is a clear conflict.
    kasou.run("vm", "create", "ok1", "--image", "tiny", "--start")
    r = kasou.run("vm", "start", "ok1", check=False)
    assert r.returncode == 4 and "already running" in r.stderr  # a conflict
    r = kasou.run("vm", "create", "ok1", "--image", "tiny", check=False)
    assert r.returncode == 4 and "already exists" in r.stderr
