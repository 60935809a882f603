"""VMs marked --onboot start in order when their host boots (kasou.control.onboot), through the API."""

from __future__ import annotations

import time
import uuid

from tests.functional.conftest import Env


def boot_host(env: Env) -> None:
    """The host reboots: its QEMUs are gone, and its agent starts again finding none."""
    for name in list(env.driver.specs):
        env.driver.crash(name)
    assert env.agent is not None
    env.agent.run_id = uuid.uuid4().hex
    env.agent.started_empty = True


def wait_states(env: Env, want: dict[str, str], timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = {n: env.api.get(f"/v1/vms/{n}").json()["state"] for n in want}
        if got == want:
            return
        time.sleep(0.1)
    raise AssertionError(f"states {got}, wanted {want}")


def started_at(env: Env, name: str) -> float:
    history = env.api.get(f"/v1/vms/{name}/history").json()
    return max(float(h["time"]) for h in history if h["event"] == "started")


def test_onboot_vms_start_in_order_with_their_delay_when_the_host_boots(env: Env) -> None:
    env.create("app", start=True, startup={"onboot": True, "order": 2})
    env.create("db", start=True, startup={"onboot": True, "order": 1, "delay_s": 1})
    env.create("scratch", start=True)
    assert env.api.get("/v1/vms/db").json()["startup"] == {"onboot": True, "order": 1, "delay_s": 1}
    boot_host(env)
    wait_states(env, {"db": "running", "app": "running", "scratch": "crashed"})
    assert started_at(env, "app") - started_at(env, "db") >= 1.0  # db first, then its delay
    time.sleep(2.5)  # more than a reconcile round: nothing starts twice, nothing else starts
    wait_states(env, {"db": "running", "app": "running", "scratch": "crashed"})


def test_an_agent_restart_with_vms_running_or_a_stopped_vm_after_the_boot_starts_nothing(env: Env) -> None:
    env.create("db", start=True, startup={"onboot": True})
    env.create("lab", start=True, startup={"onboot": True})
    env.act("lab", "stop")
    assert env.agent is not None
    env.agent.run_id = uuid.uuid4().hex  # the agent restarted; the VMs kept running: not a boot
    time.sleep(2.5)
    wait_states(env, {"db": "running", "lab": "stopped"})
    boot_host(env)
    wait_states(env, {"db": "running", "lab": "running"})
    env.act("lab", "stop")  # an operator stops it after the boot: it stays stopped
    time.sleep(2.5)
    wait_states(env, {"db": "running", "lab": "stopped"})


def test_startup_settings_are_checked_and_changed_with_vm_set(env: Env) -> None:
    r = env.api.post("/v1/vms", json={"name": "x", "image": "tiny", "startup": {"onboot": True, "order": -1}})
    assert r.status_code == 422 and "start-up order must be between 0 and 1000" in r.json()["message"], r.text
    r = env.api.post("/v1/vms", json={"name": "x", "image": "tiny", "startup": {"delay_s": 601}})
    assert r.status_code == 422 and "start-up delay must be between 0 and 600 s" in r.json()["message"], r.text
    assert env.api.get("/v1/vms").json() == []
    env.create("x")
    r = env.api.patch("/v1/vms/x", json={"startup": {"onboot": True, "order": 5, "delay_s": 30}})
    assert r.status_code == 200 and r.json()["startup"] == {"onboot": True, "order": 5, "delay_s": 30}, r.text
    r = env.api.patch("/v1/vms/x", json={"startup": {"onboot": False}})
    assert r.json()["startup"]["onboot"] is False


def test_after_a_power_cut_the_vms_of_one_order_start_in_parallel_and_a_failure_is_an_event(env: Env) -> None:
    """Not one at a time: the host's VMs of one start-up order start as one bulk start (its groups in the job's
    result); one that does not start is a critical event naming it and why, and the others still start."""
    env.create("db", start=True, startup={"onboot": True, "order": 1})
    for n in ("ris", "pacs", "lab"):
        env.create(n, start=True, startup={"onboot": True, "order": 2})
    env.driver.fail_next_start = "no room for its memory"  # the first start after the boot: db's
    boot_host(env)
    wait_states(env, {"db": "crashed", "ris": "running", "pacs": "running", "lab": "running"})
    bulk = [j for j in env.api.get("/v1/jobs").json() if j.get("kind") == "bulk-start"]
    assert bulk and bulk[0]["result"]["groups"] == [["db"], ["lab", "pacs", "ris"]], bulk
    failed = [e for e in env.api.get("/v1/events").json() if e["kind"] == "vm_onboot_failed"]
    assert len(failed) == 1 and failed[0]["subject"] == "vm/db" and "no room" in failed[0]["message"], failed
    assert failed[0]["severity"] == "critical"
