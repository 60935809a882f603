"""The VM lifecycle through the REST API, with the fake driver."""

from __future__ import annotations

import json

import pytest

from tests.functional.conftest import Env


def test_create_start_show_list(env: Env) -> None:
    vm = env.create("emr-db1", start=True)
    assert vm["state"] == "running"
    assert vm["host"] == "host1"
    assert vm["guest_ready"] is True
    for key in ("name", "state", "host", "vcpus", "memory_mib", "disks", "guest_ready", "uptime_s"):
        assert key in vm
    assert vm["disks"][0]["format"] == "qcow2"
    listed = env.api.get("/v1/vms").json()
    assert [v["name"] for v in listed] == ["emr-db1"]
    assert listed[0].keys() == vm.keys()


def test_full_lifecycle_and_ledger(env: Env) -> None:
    env.create("lab1")
    assert env.api.get("/v1/vms/lab1").json()["state"] == "stopped"
    assert env.act("lab1", "start")["state"] == "succeeded"
    assert env.act("lab1", "pause")["result"]["state"] == "paused"
    assert env.act("lab1", "resume")["result"]["state"] == "running"
    assert env.act("lab1", "reboot")["state"] == "succeeded"
    assert env.act("lab1", "shutdown")["result"]["state"] == "stopped"
    assert env.act("lab1", "start")["result"]["state"] == "running"
    assert env.act("lab1", "stop")["result"]["state"] == "stopped"
    events = [e["event"] for e in env.api.get("/v1/vms/lab1/history").json()]
    assert events == [
        "defined", "started", "paused", "resumed", "restarted", "stopped", "started", "stopped",
    ]  # fmt: skip
    r = env.api.delete("/v1/vms/lab1")
    assert env.wait(r.json()["job"])["state"] == "succeeded"
    assert env.api.get("/v1/vms/lab1").status_code == 404
    assert env.disk_files() == []


def test_graceful_shutdown_times_out_into_hard_stop(env: Env) -> None:
    env.create("hung", start=True)
    env.driver.powerdown_exits = False
    job = env.act("hung", "shutdown", timeout=0.5)
    assert job["state"] == "succeeded"
    hist = env.api.get("/v1/vms/hung/history").json()
    assert "stopped hard" in hist[-1]["detail"]


@pytest.mark.parametrize(
    ("action", "state_setup", "status"),
    [
        ("start", "running", 409),
        ("resume", "running", 409),
        ("pause", "stopped", 409),
        ("shutdown", "stopped", 409),
    ],
)
def test_wrong_state_is_409_and_changes_nothing(env: Env, action: str, state_setup: str, status: int) -> None:
    env.create("pharm1", start=state_setup == "running")
    before = env.api.get("/v1/vms/pharm1").json()
    r = env.api.post(f"/v1/vms/pharm1/actions/{action}")
    assert r.status_code == status
    assert r.json()["code"] == "wrong_state"
    assert "\n" not in r.json()["message"]
    after = env.api.get("/v1/vms/pharm1").json()
    assert after["state"] == before["state"]


def test_delete_running_needs_force(env: Env) -> None:
    env.create("ris1", start=True)
    r = env.api.delete("/v1/vms/ris1")
    assert r.status_code == 409
    assert "stop it first" in r.json()["message"]
    r = env.api.delete("/v1/vms/ris1", params={"force": True})
    assert env.wait(r.json()["job"])["state"] == "succeeded"
    assert env.driver.vms == {}


def test_crash_is_noticed_and_ledgered(env: Env) -> None:
    env.create("billing", start=True)
    env.driver.crash("billing")
    vm = env.api.get("/v1/vms/billing").json()
    assert vm["state"] == "crashed"
    assert vm["guest_ready"] is False
    assert env.api.get("/v1/vms/billing/history").json()[-1]["event"] == "crashed"
    assert env.act("billing", "start")["result"]["state"] == "running"


def test_failed_start_in_create_leaves_nothing(env: Env) -> None:
    env.driver.fail_next_start = "could not open disk"
    r = env.api.post("/v1/vms", json={"name": "broken", "image": "tiny", "start": True})
    assert r.status_code == 202
    job = env.wait(r.json()["job"])
    assert job["state"] == "failed"
    assert "could not open disk" in job["error"]["message"]
    assert env.api.get("/v1/vms/broken").status_code == 404
    assert env.disk_files() == []
    assert env.driver.vms == {}
    assert env.api.get("/v1/vms/broken/history").status_code == 404


def test_linked_clone_from_template(env: Env) -> None:
    env.create("base")
    assert env.api.post("/v1/vms/base/template").json()["state"] == "template"
    assert env.api.post("/v1/vms/base/actions/start").status_code == 409
    clone = env.create("desk1", template="base", image=None)
    assert clone["template"] == "base"
    assert clone["disks"][0]["linked"] is True
    assert clone["disks"][0]["backing"].endswith("base/disk0.qcow2")
    r = env.api.delete("/v1/vms/base")
    assert r.status_code == 409
    assert "desk1" in r.json()["message"]


def test_duplicate_and_unknown(env: Env) -> None:
    env.create("dup")
    r = env.api.post("/v1/vms", json={"name": "dup", "image": "tiny"})
    assert r.status_code == 409
    assert r.json()["code"] == "already_exists"
    r = env.api.post("/v1/vms", json={"name": "x", "image": "nosuch"})
    assert r.status_code == 422
    assert "unknown image" in r.json()["message"]
    r = env.api.post("/v1/vms", json={"name": "y", "template": "nosuch"})
    assert r.status_code == 422
    assert env.api.get("/v1/vms/nosuch").status_code == 404
    assert env.api.post("/v1/vms/nosuch/actions/start").status_code == 404
    assert env.api.post("/v1/vms/dup/actions/explode").status_code == 422
    assert [v["name"] for v in env.api.get("/v1/vms").json()] == ["dup"]


@pytest.mark.parametrize(
    "body",
    [
        {"name": "", "image": "tiny"},
        {"name": "a/b", "image": "tiny"},
        {"name": "..", "image": "tiny"},
        {"name": "a b", "image": "tiny"},
        {"name": "x;rm -rf", "image": "tiny"},
        {"name": "a" * 64, "image": "tiny"},
        {"name": "ok", "image": "tiny", "vcpus": 0},
        {"name": "ok", "image": "tiny", "vcpus": -1},
        {"name": "ok", "image": "tiny", "vcpus": "two"},
        {"name": "ok", "image": "tiny", "vcpus": 4096},
        {"name": "ok", "image": "tiny", "memory_mib": 0},
        {"name": "ok", "image": "tiny", "memory_mib": 10**9},
        {"name": "ok", "image": "tiny", "disk": "lots"},
        {"name": "ok", "image": "tiny", "disk": "-1G"},
        {"name": "ok"},
        {"name": "ok", "image": "tiny", "surprise": 1},
        {"name": "ok", "image": "tiny", "cpu": "Pentium-Pro"},
        {"name": "ok", "image": "tiny", "cpu": "host"},  # the hosts here run TCG
        {"name": "ok", "image": "tiny", "machine": "pc-i440fx-7.2"},
        {"name": "ok", "image": "tiny", "machine": "q35,accel=kvm"},
    ],
)
def test_bad_input_is_422_and_changes_nothing(env: Env, body: dict) -> None:
    r = env.api.post("/v1/vms", json=body)
    assert r.status_code == 422, r.text
    assert r.json()["message"]
    assert "\n" not in r.json()["message"]
    assert env.api.get("/v1/vms").json() == []
    assert env.disk_files() == []


def test_more_vcpus_or_memory_than_the_host(env: Env) -> None:
    r = env.api.post("/v1/vms", json={"name": "big", "image": "tiny", "vcpus": 200})
    assert r.status_code == 422
    assert "more than any host has" in r.json()["message"]
    r = env.api.post("/v1/vms", json={"name": "big", "image": "tiny", "memory_mib": 4 * 1024 * 1024})
    assert r.status_code == 422


def test_token_required(env: Env) -> None:
    r = env.api.get("/v1/vms", headers={"Authorization": ""})
    assert r.status_code == 401
    r = env.api.get("/v1/vms", headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401
    assert r.json()["code"] == "unauthorized"


def test_busy_vm_refuses_a_second_operation(env: Env) -> None:
    env.create("slow", start=True)
    env.driver.powerdown_exits = False
    r1 = env.api.post("/v1/vms/slow/actions/shutdown", params={"timeout": 5})
    assert r1.status_code == 202
    r2 = env.api.post("/v1/vms/slow/actions/reboot")
    assert r2.status_code == 409
    assert "busy" in r2.json()["message"]
    # A stop may cut a graceful shutdown short.
    r3 = env.api.post("/v1/vms/slow/actions/stop")
    assert r3.status_code == 202
    env.wait(r3.json()["job"])
    assert env.wait(r1.json()["job"])["state"] == "succeeded"
    assert env.api.get("/v1/vms/slow").json()["state"] == "stopped"


def test_console_log(env: Env) -> None:
    env.create("c1", start=True)
    assert "KASOU-READY" in env.api.get("/v1/vms/c1/console").text


def test_a_vm_is_pinned_to_a_cpu_model_and_a_versioned_machine(env: Env) -> None:
    """A VM keeps its virtual hardware across QEMU upgrades and migrations: its machine type is the versioned
    q35 of the QEMU that made it (the host says 7.2 here), its CPU model the migration-safe default."""
    vm = env.create("pacs1", start=True)
    assert (vm["cpu"], vm["machine"]) == ("x86-64-v2-AES", "pc-q35-7.2")
    vm = env.create("lis1", cpu="x86-64-v3", machine="pc-q35-7.1")
    assert (vm["cpu"], vm["machine"]) == ("x86-64-v3", "pc-q35-7.1")
    r = env.api.post("/v1/vms", json={"name": "emr", "image": "tiny", "cpu": "host"})
    assert r.status_code == 422 and "needs KVM on every host" in r.json()["message"] and "host1" in r.json()["message"]


def test_an_image_that_needs_more_memory_is_refused_with_its_minimum(env: Env) -> None:
    manifest = env.tmp / "images" / "tiny" / "manifest.json"
    data = json.loads(manifest.read_text())
    manifest.write_text(json.dumps({**data, "min_memory_mib": 384}))
    r = env.api.post("/v1/vms", json={"name": "small", "image": "tiny", "memory_mib": 128})
    assert r.status_code == 422, r.text
    assert "needs at least 384 MiB" in r.json()["message"] and "--memory 384" in r.json()["message"]
    assert env.api.get("/v1/vms/small").status_code == 404
    assert env.create("big", memory_mib=384)["memory_mib"] == 384
