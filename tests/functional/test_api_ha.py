"""High availability through the API, with fake hosts: failover, restart in place, VM monitoring, settings."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.functional.conftest import Cluster, Env, make_cluster


def _events(cluster: Cluster, name: str) -> list[tuple[str, str | None]]:
    return [(e["event"], e["host"]) for e in cluster.api.get(f"/v1/vms/{name}/history").json()]


def _move(cluster: Cluster, name: str, host: str) -> None:
    if cluster.host_of(name) != host:
        r = cluster.api.post(f"/v1/vms/{name}/migrate", json={"to": host})
        assert cluster.wait(r.json()["job"])["state"] == "succeeded"


def test_ha_vms_of_a_failed_host_restart_elsewhere_by_priority(cluster: Cluster) -> None:
    for name, prio in (("diet", 10), ("emr", 90), ("lab", 50)):
        cluster.create(name, start=True, storage="shared", ha=True, priority=prio)
        _move(cluster, name, "h1")
    cluster.create("plain", start=True, storage="shared")
    _move(cluster, "plain", "h1")
    cluster.fail_host("h1")

    def moved() -> Any:
        vms = {n: cluster.api.get(f"/v1/vms/{n}").json() for n in ("diet", "emr", "lab")}
        return all(v["host"] != "h1" and v["state"] == "running" and v["job"] is None for v in vms.values()) and vms

    vms = cluster.wait_for("the HA VMs restarted elsewhere", moved)
    for n, v in vms.items():
        assert cluster.drivers[v["host"]].specs[n].ha  # launched HA-protected there
        events = [e for e, _ in _events(cluster, n)]
        assert events[-3:] == ["crashed", "fenced", "restarted"], events
    restarts = sorted(
        (e["time"], n) for n in vms for e in cluster.api.get(f"/v1/vms/{n}/history").json() if e["event"] == "restarted"
    )
    assert [n for _, n in restarts] == ["emr", "lab", "diet"]  # highest priority first
    plain = cluster.api.get("/v1/vms/plain").json()
    assert plain["host"] == "h1" and not plain["host_reachable"]  # not HA: left where it was
    assert plain["state"] == "unknown"  # its host is down: nobody knows whether it runs
    rows = {r["name"]: r for r in cluster.api.get("/v1/reports/uptime").json()}
    assert rows["emr"]["stops"] == 1 and rows["emr"]["running"]


def test_a_local_disk_ha_vm_of_an_older_kasou_waits_for_its_host_and_says_so(cluster: Cluster) -> None:
    cluster.create("pharm", start=True)  # local disk; HA set on it as kasou allowed before it was refused
    cluster.api.portal.call(cluster.services.vms.records.update, "pharm",  # type: ignore[attr-defined]
                            lambda r: r.model_copy(update={"ha": True, "ha_armed": True}))  # fmt: skip
    v = cluster.api.get("/v1/vms/pharm").json()
    assert v["ha"] and not v["ha_armed"]  # its disk is on its host alone: no restart elsewhere is possible
    host = cluster.host_of("pharm")
    cluster.fail_host(host)
    ev = cluster.wait_for("the cannot-restart event", lambda: _critical(cluster, "vm_not_restarted", "vm/pharm"))
    assert host in ev[0]["message"] and "local" in ev[0]["message"], ev
    time.sleep(2.5)  # more than a reconcile round
    v = cluster.api.get("/v1/vms/pharm").json()
    assert v["host"] == host and v["job"] is None and v["state"] == "unknown"


def test_an_ha_vm_whose_qemu_died_is_restarted_on_its_host(cluster: Cluster) -> None:
    cluster.create("emr", start=True, storage="shared", ha=True)
    host = cluster.host_of("emr")
    cluster.drivers[host].crash("emr")
    cluster.wait_for("the restart", lambda: _events(cluster, "emr")[-1] == ("restarted", host))
    v = cluster.api.get("/v1/vms/emr").json()
    assert v["state"] == "running" and v["host"] == host


def test_a_crashed_vm_without_ha_stays_crashed(cluster: Cluster) -> None:
    cluster.create("x", start=True)
    host = cluster.host_of("x")
    cluster.drivers[host].crash("x")
    cluster.wait_for("the crash", lambda: cluster.api.get("/v1/vms/x").json()["state"] == "crashed")
    time.sleep(2.5)
    assert cluster.api.get("/v1/vms/x").json()["state"] == "crashed"


def test_a_hung_guest_is_reset(cluster: Cluster) -> None:
    cluster.create("emr", start=True, storage="shared", ha=True)
    host = cluster.host_of("emr")
    d = cluster.drivers[host]
    d.vms["emr"] = d.vms["emr"].model_copy(update={"heartbeat_age_s": 60.0})
    cluster.wait_for("the reset", lambda: _events(cluster, "emr")[-1][0] == "restarted")
    history = cluster.api.get("/v1/vms/emr/history").json()
    assert "no heartbeat" in history[-2]["detail"] and "VM monitoring" in history[-1]["detail"]


def test_vm_set_changes_ha_and_says_when_it_takes_effect(cluster: Cluster) -> None:
    cluster.create("lab", start=True, storage="shared")
    v = cluster.api.patch("/v1/vms/lab", json={"ha": True, "priority": 80}).json()
    assert v["ha"] and v["priority"] == 80 and not v["ha_armed"]  # the running QEMU was not launched protected
    r = cluster.api.patch("/v1/vms/lab", json={"priority": 101})
    assert r.status_code == 422 and "priority" in r.json()["message"]
    r = cluster.api.patch("/v1/vms/lab", json={})
    assert r.status_code == 422
    r = cluster.api.patch("/v1/vms/lab", json={"ha": "maybe"})
    assert r.status_code == 422
    assert cluster.api.get("/v1/vms/lab").json()["priority"] == 80


# -- HA needs a disk another host reaches; a failed host and what it leaves behind are heard of --------------


@pytest.fixture
def cluster_2cpu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Cluster]:
    """Three hosts of 2 CPUs and 16 GiB each (the lab's shape)."""
    monkeypatch.setattr("kasou.agent.app.cpu_count", lambda: 2)
    monkeypatch.setattr("kasou.agent.app.memory_mib", lambda: (16384, 16000))
    yield from make_cluster(tmp_path, ["h1", "h2", "h3"])


def _critical(cluster: Cluster, kind: str, subject: str) -> list[dict]:
    events = cluster.api.get("/v1/events", params={"severity": "critical"}).json()
    return [e for e in events if e["kind"] == kind and e["subject"] == subject and e["severity"] == "critical"]


def test_ha_on_a_local_disk_vm_in_a_cluster_is_refused_with_the_way_out(cluster: Cluster) -> None:
    body = {"name": "a0", "image": "tiny", "vcpus": 1, "memory_mib": 128, "ha": True, "start": True}
    r = cluster.api.post("/v1/vms", json=body)
    assert r.status_code == 422, r.text
    msg = r.json()["message"]
    assert "local" in msg and "--replicated" in msg and "--shared" in msg, msg
    assert "\n" not in msg
    assert cluster.api.get("/v1/vms/a0").status_code == 404  # nothing created
    assert all(not d.specs for d in cluster.drivers.values())
    for storage in ("shared", "replicated"):  # the ways out work
        v = cluster.create(f"a-{storage}", start=True, storage=storage, ha=True)
        assert v["ha"] and v["storage"] == storage


def test_vm_set_ha_on_of_a_local_disk_vm_in_a_cluster_is_refused_with_the_way_out(cluster: Cluster) -> None:
    cluster.create("lab", start=True)  # local disk
    r = cluster.api.patch("/v1/vms/lab", json={"ha": True, "priority": 80})
    assert r.status_code == 422, r.text
    msg = r.json()["message"]
    assert "local" in msg and "--replicated" in msg and "--shared" in msg, msg
    v = cluster.api.get("/v1/vms/lab").json()
    assert not v["ha"] and v["priority"] == 50  # nothing changed
    assert cluster.api.patch("/v1/vms/lab", json={"ha": False}).status_code == 200  # off is always fine


def test_a_down_host_is_a_critical_event_and_its_vms_show_unknown(cluster: Cluster) -> None:
    cluster.create("emr", start=True, storage="shared", ha=True)
    cluster.create("plain", start=True)  # not HA, local disk
    _move(cluster, "emr", "h1")
    _move(cluster, "plain", "h1")
    cluster.fail_host("h1")
    cluster.wait_for("the host-down event", lambda: _critical(cluster, "host_down", "host/h1"))
    plain = cluster.api.get("/v1/vms/plain").json()
    assert plain["state"] == "unknown" and plain["host"] == "h1" and not plain["host_reachable"]
    assert not plain["ha_armed"]
    assert any(v["name"] == "plain" and v["state"] == "unknown" for v in cluster.api.get("/v1/vms").json())
    left = cluster.wait_for("the VM-left-behind event", lambda: _critical(cluster, "vm_host_down", "vm/plain"))
    assert "h1" in left[0]["message"] and "not HA" in left[0]["message"]
    cluster.wait_for("emr restarted", lambda: cluster.api.get("/v1/vms/emr").json()["host"] != "h1")
    assert not _critical(cluster, "vm_host_down", "vm/emr")  # it was restarted: nothing left behind
    time.sleep(1.5)
    assert len(_critical(cluster, "host_down", "host/h1")) == 1  # raised once, not every round
    cluster.services.agents._up.add("h1")  # back
    cluster.wait_for(
        "the host-up event",
        lambda: [
            e for e in cluster.api.get("/v1/events").json() if e["kind"] == "host_up" and e["subject"] == "host/h1"
        ],
    )
    assert not [e for e in cluster.api.get("/v1/events/active").json() if e["subject"] in ("host/h1", "vm/plain")]


def test_an_ha_vm_that_cannot_be_restarted_is_a_critical_event(cluster: Cluster) -> None:
    cluster.create("emr", start=True, storage="shared", ha=True)
    _move(cluster, "emr", "h1")
    for h in ("h2", "h3"):  # nowhere to go: both other hosts in maintenance (they are empty)
        r = cluster.api.post(f"/v1/hosts/{h}/maintenance")
        assert r.status_code == 202, r.text
    v = cluster.api.get("/v1/vms/emr").json()
    assert v["ha"] and not v["ha_armed"]  # no other host could take it now
    cluster.fail_host("h1")
    ev = cluster.wait_for("the cannot-restart event", lambda: _critical(cluster, "vm_not_restarted", "vm/emr"))
    assert "emr" in ev[0]["message"] and "h1" in ev[0]["message"], ev
    assert cluster.api.get("/v1/vms/emr").json()["state"] == "unknown"


def test_a_vcpu_bound_ha_refusal_names_vcpus_with_numbers(cluster_2cpu: Cluster) -> None:
    cluster = cluster_2cpu  # 3 hosts of 2 CPUs (8 vCPUs each at 4:1) and plenty of memory: vCPUs bind
    for i in range(16):
        cluster.create(f"v{i:02d}", start=True, storage="shared", ha=True)
    body = {"name": "ris", "image": "tiny", "vcpus": 1, "memory_mib": 128, "storage": "shared", "ha": True,
            "start": True}  # fmt: skip
    r = cluster.api.post("/v1/vms", json=body)
    assert r.status_code == 409, r.text
    msg = r.json()["message"]
    assert "vCPU" in msg and "8 of 8" in msg and "MiB free" not in msg, msg
    assert cluster.api.get("/v1/vms/ris").status_code == 404


def test_on_one_host_ha_on_a_local_disk_means_a_restart_on_that_host(env: Env) -> None:
    v = env.create("emr", start=True, ha=True)  # one host: nothing to restart it elsewhere, nothing refused
    assert v["ha"] and not v["ha_armed"] and "one host" in v["ha_blocked"], v
    env.driver.crash("emr")
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        events = [e["event"] for e in env.api.get("/v1/vms/emr/history").json()]
        if events[-2:] == ["crashed", "restarted"]:
            break
        time.sleep(0.05)
    assert events[-2:] == ["crashed", "restarted"], events
    r = env.api.patch("/v1/vms/emr", json={"ha": False})
    assert r.status_code == 200 and env.api.patch("/v1/vms/emr", json={"ha": True}).status_code == 200
