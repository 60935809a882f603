"""High availability through the API, with fake hosts: failover, restart in place, VM monitoring, settings."""

from __future__ import annotations

from typing import Any

from tests.functional.conftest import Cluster


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
    rows = {r["name"]: r for r in cluster.api.get("/v1/reports/uptime").json()}
    assert rows["emr"]["stops"] == 1 and rows["emr"]["running"]


def test_a_local_disk_vm_waits_for_its_host(cluster: Cluster) -> None:
    cluster.create("pharm", start=True, ha=True)  # local disk
    host = cluster.host_of("pharm")
    cluster.fail_host(host)
    import time

    time.sleep(3)  # more than a reconcile round
    v = cluster.api.get("/v1/vms/pharm").json()
    assert v["host"] == host and v["job"] is None


def test_an_ha_vm_whose_qemu_died_is_restarted_on_its_host(cluster: Cluster) -> None:
    cluster.create("emr", start=True, ha=True)
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
    import time

    time.sleep(2.5)
    assert cluster.api.get("/v1/vms/x").json()["state"] == "crashed"


def test_a_hung_guest_is_reset(cluster: Cluster) -> None:
    cluster.create("emr", start=True, ha=True)
    host = cluster.host_of("emr")
    d = cluster.drivers[host]
    d.vms["emr"] = d.vms["emr"].model_copy(update={"heartbeat_age_s": 60.0})
    cluster.wait_for("the reset", lambda: _events(cluster, "emr")[-1][0] == "restarted")
    history = cluster.api.get("/v1/vms/emr/history").json()
    assert "no heartbeat" in history[-2]["detail"] and "VM monitoring" in history[-1]["detail"]


def test_vm_set_changes_ha_and_says_when_it_takes_effect(cluster: Cluster) -> None:
    cluster.create("lab", start=True)
    v = cluster.api.patch("/v1/vms/lab", json={"ha": True, "priority": 80}).json()
    assert v["ha"] and v["priority"] == 80 and not v["ha_armed"]  # the running QEMU was not launched protected
    r = cluster.api.patch("/v1/vms/lab", json={"priority": 101})
    assert r.status_code == 422 and "priority" in r.json()["message"]
    r = cluster.api.patch("/v1/vms/lab", json={})
    assert r.status_code == 422
    r = cluster.api.patch("/v1/vms/lab", json={"ha": "maybe"})
    assert r.status_code == 422
    assert cluster.api.get("/v1/vms/lab").json()["priority"] == 80
