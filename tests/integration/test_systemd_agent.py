"""The agent run by its shipped unit (packaging/systemd/kasou-agent.service): ``systemctl stop`` and
``systemctl restart kasou-agent``, as systemd does them with the unit's KillMode (reproduced by
:mod:`tests.integration.systemd_sim`, since PID 1 here is not systemd), leave a VM's QEMU running with
the same pid, and the agent started again takes it back."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import httpx
import pytest

from kasou.hypervisor.qemu import confine
from tests.integration.conftest import Kasou, pid_alive, qemu_pids_of
from tests.integration.systemd_sim import SimulatedUnit
from tests.packaging.units import UNIT_DIR

pytestmark = pytest.mark.qemu


def agent_answers(kasou: Kasou) -> bool:
    try:
        with httpx.Client(transport=httpx.HTTPTransport(uds=str(kasou.paths.agent_socket)), timeout=3) as c:
            return c.get("http://agent/agent/v1/ping").status_code == 200
    except httpx.HTTPError:
        return False


def test_agent_unit_stop_and_restart_leave_vms_running(kasou: Kasou) -> None:
    unit = SimulatedUnit(UNIT_DIR / "kasou-agent.service", f"kasou-test-{kasou.home.name}.slice",
                         kasou.paths.logs / "agent-unit.log")  # fmt: skip
    assert unit.kill_mode == "process"
    # The demo's agent makes way for the unit's (the API, started by `kasou up`, stays).
    kasou.run("down")
    try:

        def start() -> int:
            pid = unit.start([sys.executable, "-m", "kasou", "agent"], kasou.env)
            kasou.paths.pidfile("agent").write_text(f"{pid}\n")  # so the fixture's teardown ends it too
            kasou.wait_for("the unit's agent to answer", lambda: agent_answers(kasou), timeout=120)
            return pid

        start()
        kasou.run("up", timeout=120)  # the agent answers: only the API is started
        assert unit.main is not None and kasou.service_pid("agent") == unit.main.pid
        kasou.run("vm", "create", "emr1", "--image", "tiny", "--start")
        before = kasou.wait_ready("emr1")
        [qemu] = qemu_pids_of(kasou.home)
        in_unit = qemu in unit.procs()
        # On a host with the unified hierarchy the confined QEMU has moved to kasou/vm-*, out of the unit's
        # cgroup; on a hybrid or v1 host (this CI machine's) it is still in it, and only KillMode=process
        # keeps it from systemd's signals.
        assert in_unit == (not confine.cgroup_v2()), (in_unit, unit.hierarchy)

        # systemctl stop kasou-agent
        unit.stop()
        assert unit.main is not None and unit.main.poll() is not None  # the agent itself ended
        assert [p for p, _ in unit.signalled if p == qemu] == []
        time.sleep(1.0)
        assert pid_alive(qemu), "stopping the agent's unit must never stop a VM"

        # systemctl start kasou-agent: the new agent attaches to the running QEMU.
        start()
        after = kasou.wait_ready("emr1", timeout=120)
        assert after["state"] == "running"
        assert after["started_at"] == pytest.approx(before["started_at"], abs=0.05)
        assert after["uptime_s"] >= before["uptime_s"]
        assert qemu_pids_of(kasou.home) == [qemu]

        # systemctl restart kasou-agent (stop, then start, in the same cgroup), then control through it.
        kasou.paths.pidfile("agent").write_text(f"{unit.restart()}\n")
        kasou.wait_for("the restarted agent to answer", lambda: agent_answers(kasou), timeout=120)
        assert pid_alive(qemu) and qemu_pids_of(kasou.home) == [qemu]
        seq = kasou.seqs("emr1")
        assert kasou.wait_ready("emr1", timeout=120)["started_at"] == pytest.approx(before["started_at"], abs=0.05)
        kasou.wait_for("the guest writing on", lambda: kasou.seqs("emr1")[-1:] > seq[-1:], timeout=30)
        kasou.run("vm", "stop", "emr1")
        assert qemu_pids_of(kasou.home) == []
    finally:
        unit.release()


def test_simulated_control_group_mode_would_end_what_the_agent_leaves(tmp_path: Path) -> None:
    """The simulation is not vacuous: with KillMode=control-group (the default an agent unit would have
    without the line) a child the main process left in the cgroup is signalled and ends."""
    text = (UNIT_DIR / "kasou-agent.service").read_text().replace("KillMode=process", "KillMode=control-group")
    (tmp_path / "kasou-agent.service").write_text(text)
    unit = SimulatedUnit(tmp_path / "kasou-agent.service", f"kasou-test-{tmp_path.name}.slice", tmp_path / "log")
    script = "import subprocess, time; subprocess.Popen(['sleep', '60'], start_new_session=True); time.sleep(60)"
    try:
        unit.start([sys.executable, "-c", script], {"PATH": "/usr/bin:/bin"})
        deadline = time.monotonic() + 10
        while len(unit.procs()) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        [child] = [p for p in unit.procs() if unit.main and p != unit.main.pid]
        unit.stop()
        time.sleep(0.2)
        assert not pid_alive(child)
        assert (child, "SIGTERM") in unit.signalled
    finally:
        unit.release()
