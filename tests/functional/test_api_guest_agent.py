"""The QEMU guest agent through the API, with the fake driver: the guest object, readiness, shutdown through
the agent (then the power button, then a hard stop), fsfreeze around snapshots and backups, hung guests."""

from __future__ import annotations

import time

from typer.testing import CliRunner

from kasou.api.client import Client
from kasou.cli import common
from kasou.cli import main as cli
from tests.functional.conftest import TOKEN, Cluster, Env
from tests.functional.test_api_backups import backup
from tests.functional.test_api_snapshots import snap

DEBIAN = {"os": "Debian GNU/Linux 12 (bookworm)", "hostname": "emr-db1", "ips": ["10.0.2.15"]}


def test_vm_show_has_the_guest_object(env: Env) -> None:
    env.create("emr", start=True)
    g = env.api.get("/v1/vms/emr").json()["guest"]
    assert g == {"agent": False, "agent_age_s": None, "os": None, "hostname": None, "ips": []}
    env.driver.set_guest_agent("emr", **DEBIAN)
    g = env.api.get("/v1/vms/emr").json()["guest"]
    assert g["agent"] and g["hostname"] == "emr-db1" and g["ips"] == ["10.0.2.15"] and g["os"].startswith("Debian")
    assert 'kasou_vm_guest_agent_age_seconds{vm="emr"} 0' in env.api.get("/metrics").text
    env.act("emr", "stop")
    assert env.api.get("/v1/vms/emr").json()["guest"]["agent"] is False  # a stopped VM has no guest to answer


def test_a_real_os_is_ready_when_its_agent_answers(env: Env) -> None:
    env.create("pacs", start=True)
    env.driver.set_guest_agent("pacs", answering=False, heartbeat=False)
    assert env.api.get("/v1/vms/pacs").json()["guest_ready"] is False
    env.driver.set_guest_agent("pacs", heartbeat=False)
    v = env.api.get("/v1/vms/pacs").json()
    assert v["guest_ready"] is True and v["uptime_s"] is None


def test_shutdown_goes_through_the_agent_first(env: Env) -> None:
    env.create("emr", start=True)
    env.driver.set_guest_agent("emr")
    job = env.act("emr", "shutdown")
    assert job["result"]["state"] == "stopped" and job["result"]["shutdown"] == "agent"
    assert env.driver.agent_shutdowns == ["emr"]
    assert "through the guest agent" in env.api.get("/v1/vms/emr/history").json()[-1]["detail"]


def test_without_an_agent_shutdown_presses_the_power_button(env: Env) -> None:
    env.create("lab", start=True)
    job = env.act("lab", "shutdown")
    assert job["result"]["shutdown"] == "acpi" and env.driver.agent_shutdowns == []
    assert "ACPI power button" in env.api.get("/v1/vms/lab/history").json()[-1]["detail"]


def test_an_agent_shutdown_that_does_not_end_the_guest_falls_back_to_the_button_then_a_hard_stop(env: Env) -> None:
    env.create("stuck", start=True)
    env.driver.set_guest_agent("stuck")
    env.driver.agent_shutdown_exits = False
    env.driver.powerdown_exits = False
    t0 = time.monotonic()
    job = env.act("stuck", "shutdown", timeout=1.0)
    assert job["result"]["shutdown"] == "hard-stop" and time.monotonic() - t0 < 5
    detail = env.api.get("/v1/vms/stuck/history").json()[-1]["detail"]
    assert "stopped hard" in detail and "ACPI power button" in detail  # the button was pressed after the agent
    assert env.driver.agent_shutdowns == ["stuck"]


def test_an_agent_that_answered_then_pressed_button_after_half_the_time(env: Env) -> None:
    env.create("slow", start=True)
    env.driver.set_guest_agent("slow")
    env.driver.agent_shutdown_exits = False  # the agent's shutdown does nothing; the button works
    job = env.act("slow", "shutdown", timeout=1.0)
    assert job["result"]["shutdown"] == "acpi" and job["result"]["state"] == "stopped"


def test_snapshots_and_backups_say_whether_the_guest_was_frozen(env: Env) -> None:
    env.create("emr", start=True)
    s1 = snap(env, "emr", "s1")
    assert s1["result"]["consistency"] == "crash"  # no agent answers: as after a power cut
    env.driver.set_guest_agent("emr")
    s2 = snap(env, "emr", "s2")
    assert s2["result"]["consistency"] == "application" and env.driver.freezes == ["emr"]
    m = snap(env, "emr", "m1", memory=True)
    assert m["result"]["consistency"] == "memory"  # never frozen: the saved guest would wake up frozen
    shown = {s["name"]: s["consistency"] for s in env.api.get("/v1/vms/emr/snapshots").json()}
    assert shown == {"s1": "crash", "s2": "application", "m1": "memory"}

    b = backup(env, "emr")
    assert b["state"] == "succeeded" and b["result"]["consistency"] == "application"
    env.driver.set_guest_agent("emr", answering=False)
    assert backup(env, "emr")["result"]["consistency"] == "crash"
    gens = env.api.get("/v1/vms/emr/backups").json()
    assert [g["consistency"] for g in gens] == ["application", "crash"]
    env.act("emr", "stop")
    assert backup(env, "emr")["result"]["consistency"] is None  # a stopped VM's disks: nothing to freeze


def _events(cluster: Cluster, name: str) -> list[str]:
    return [e["event"] for e in cluster.api.get(f"/v1/vms/{name}/history").json()]


def test_a_guest_whose_agent_fell_silent_is_reset_one_that_never_had_one_is_not(cluster: Cluster) -> None:
    cluster.create("emr", start=True, storage="shared", ha=True)
    cluster.create("lab", start=True, storage="shared", ha=True)
    for name, answered_before in (("emr", True), ("lab", False)):
        d = cluster.drivers[cluster.host_of(name)]
        d.set_guest_agent(name, answering=answered_before, heartbeat=False)
        if answered_before:
            d.set_guest_agent(name, answering=False, heartbeat=False)
        info = d.vms[name]
        guest = info.guest.model_copy(update={"agent_age_s": 600.0 if answered_before else None})
        d.vms[name] = info.model_copy(update={"guest": guest})
    cluster.wait_for("the reset", lambda: _events(cluster, "emr")[-1] == "restarted")
    history = cluster.api.get("/v1/vms/emr/history").json()
    assert "no guest agent answer" in history[-2]["detail"]
    time.sleep(1.5)  # a few HA rounds: the guest that never had an agent is left alone
    assert _events(cluster, "lab")[-1] == "started"


def test_cli_vm_show_and_shutdown_say_what_the_agent_said(env: Env) -> None:
    env.create("emr", start=True)
    runner = CliRunner()
    common.client_factory = lambda: Client("http://testserver", TOKEN, http=env.api)
    try:
        shown = runner.invoke(cli.app, ["vm", "show", "emr"])  # a narrow terminal wraps lines: joined again
        assert "guest agent   not answering" in shown.output.replace("\n", "")
        env.driver.set_guest_agent("emr", **DEBIAN)
        shown = runner.invoke(cli.app, ["vm", "show", "emr"])
        assert "answering: Debian GNU/Linux 12 (bookworm); host name emr-db1; 10.0.2.15" in shown.output.replace(
            "\n", ""
        )
        taken = runner.invoke(cli.app, ["snapshot", "create", "emr", "s1"]).output.replace("\n", "")
        assert "application-consistent: the guest agent froze its file systems" in taken
        made = runner.invoke(cli.app, ["backup", "create", "emr"]).output.replace("\n", "")
        assert "application-consistent" in made, made
        down = runner.invoke(cli.app, ["vm", "shutdown", "emr"])
        assert down.exit_code == 0 and "stopped (graceful shutdown (through the guest agent))" in down.output.replace(
            "\n", ""
        )
    finally:
        common.client_factory = None
