"""Replicated disks through the API, with fake hosts: a replica elsewhere, rebuilt when lost, promoted by HA."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tests.doubles.driver import FakeExports
from tests.functional.conftest import Cluster


def _vm(cluster: Cluster, name: str) -> dict[str, Any]:
    return dict(cluster.api.get(f"/v1/vms/{name}").json())


def _in_sync(cluster: Cluster, name: str, not_on: set[str] | None = None) -> dict[str, Any]:
    def check() -> Any:
        v = _vm(cluster, name)
        r = v["replica"]
        ok = r is not None and r["state"] == "in_sync" and r["host"] != v["host"] and r["host"] not in (not_on or set())
        return ok and v

    return dict(cluster.wait_for(f"{name}'s replica in sync", check))


def test_a_replicated_vm_gets_a_replica_on_another_host(cluster: Cluster) -> None:
    cluster.create("emr", start=True, storage="replicated")
    v = _in_sync(cluster, "emr")
    assert v["storage"] == "replicated"
    attached = cluster.drivers[v["host"]].replicas["emr"]
    assert set(attached) == {"disk0"}
    assert any(p.name == "disk0.replica.qcow2" and "emr" in str(p) for p in FakeExports.served)


def test_a_lost_replica_is_reported_degraded_and_rebuilt_elsewhere(cluster: Cluster) -> None:
    cluster.create("emr", start=True, storage="replicated")
    v = _in_sync(cluster, "emr")
    old = v["replica"]["host"]
    cluster.drivers[v["host"]].degrade_replica("emr", "disk0")
    cluster.wait_for("degraded", lambda: (_vm(cluster, "emr")["replica"] or {}).get("state") == "degraded" or
                     (_vm(cluster, "emr")["replica"] or {}).get("host") not in (None, old))  # fmt: skip
    v = _in_sync(cluster, "emr", not_on={old})
    assert v["state"] == "running"


def test_ha_restarts_a_replicated_vm_from_its_replica(cluster: Cluster) -> None:
    cluster.create("emr", start=True, storage="replicated", ha=True)
    v = _in_sync(cluster, "emr")
    primary, replica_host = v["host"], v["replica"]["host"]
    cluster.fail_host(primary)
    cluster.wait_for("the restart", lambda: _vm(cluster, "emr")["host"] == replica_host
                     and _vm(cluster, "emr")["state"] == "running")  # fmt: skip
    v = _vm(cluster, "emr")
    assert v["disks"][0]["path"].endswith("disk0.replica.qcow2")  # started from the promoted copy
    history = cluster.api.get("/v1/vms/emr/history").json()
    assert "from its disk replica" in history[-1]["detail"]
    third = ({"h1", "h2", "h3"} - {primary, replica_host}).pop()
    v = _in_sync(cluster, "emr")  # a new replica, on the one host left that is up
    assert v["replica"]["host"] == third


def test_migration_drops_the_replica_and_a_new_one_follows(cluster: Cluster) -> None:
    cluster.create("emr", start=True, storage="replicated")
    v = _in_sync(cluster, "emr")
    target = ({"h1", "h2", "h3"} - {v["host"]}).pop()
    r = cluster.api.post("/v1/vms/emr/migrate", json={"to": target})
    job = cluster.wait(r.json()["job"])
    assert job["state"] == "succeeded", job["error"]
    v = _in_sync(cluster, "emr")
    assert v["host"] == target


def test_delete_removes_the_replica(cluster: Cluster) -> None:
    cluster.create("emr", start=True, storage="replicated")
    _in_sync(cluster, "emr")
    r = cluster.api.delete("/v1/vms/emr", params={"force": True})
    assert cluster.wait(r.json()["job"])["state"] == "succeeded"
    assert not list(cluster.tmp.rglob("*.replica.qcow2"))
    assert not any("emr" in str(p) and str(cluster.tmp) in str(p) for p in FakeExports.served)


def test_a_migrated_disk_of_a_local_pool_stays_in_that_pool(cluster: Cluster) -> None:
    r = cluster.api.post("/v1/pools", json={"name": "ssd", "path": str(cluster.tmp / "ssd")})
    assert r.status_code == 201, r.text
    v = cluster.create("lab1", start=True, pool="ssd")
    assert v["disks"][0]["pool"] == "ssd" and v["disks"][0]["path"].startswith(str(cluster.tmp / "ssd"))
    target = ({"h1", "h2", "h3"} - {v["host"]}).pop()
    job = cluster.wait(cluster.api.post("/v1/vms/lab1/migrate", json={"to": target}).json()["job"])
    assert job["state"] == "succeeded", job["error"]
    d = cluster.api.get("/v1/vms/lab1").json()["disks"][0]
    assert d["pool"] == "ssd" and d["path"] == str(cluster.tmp / "ssd" / "lab1" / "disk0-2.qcow2"), d
    assert not Path(v["disks"][0]["path"]).exists()  # under another name than the source's, which is gone
    # Back again: the name turns back.
    job = cluster.wait(cluster.api.post("/v1/vms/lab1/migrate", json={"to": v["host"]}).json()["job"])
    assert job["state"] == "succeeded", job["error"]
    assert cluster.api.get("/v1/vms/lab1").json()["disks"][0]["path"] == v["disks"][0]["path"]


def test_a_mirrored_vm_migrates_and_gets_a_new_second_copy_on_its_new_host(cluster: Cluster) -> None:
    for p in ("a", "b"):
        assert cluster.api.post("/v1/pools", json={"name": p, "path": str(cluster.tmp / p)}).status_code == 201
    v = cluster.create("pacs", start=True, mirror=["a", "b"])
    assert v["disks"][0]["mirror"]["state"] == "in_sync", v["disks"]
    old_first, old_second = v["disks"][0]["path"], v["disks"][0]["mirror"]["path"]
    target = ({"h1", "h2", "h3"} - {v["host"]}).pop()
    job = cluster.wait(cluster.api.post("/v1/vms/pacs/migrate", json={"to": target}).json()["job"])
    assert job["state"] == "succeeded", job["error"]
    assert job["result"]["mirrors"] == {"disk0": "in_sync"}, job["result"]
    v = cluster.api.get("/v1/vms/pacs").json()
    d = v["disks"][0]
    assert v["host"] == target and v["state"] == "running"
    assert d["pool"] == "a" and d["path"].endswith("/a/pacs/disk0-2.qcow2"), d
    assert d["mirror"]["pool"] == "b" and d["mirror"]["state"] == "in_sync", d
    assert d["mirror"]["path"].startswith(str(cluster.tmp / "b")) and Path(d["mirror"]["path"]).exists()
    assert not Path(old_first).exists() or old_first == d["path"]
    assert old_second == d["mirror"]["path"]  # the same file name, made anew on the new host
    assert cluster.api.get("/v1/events/active").json() == []  # a planned move raises no degraded disk
    # Host maintenance moves it too.
    r = cluster.api.post(f"/v1/hosts/{target}/maintenance", json={"on": True})
    assert r.status_code == 202, r.text
    assert cluster.wait(r.json()["job"])["state"] == "succeeded"
    v = cluster.api.get("/v1/vms/pacs").json()
    assert v["host"] != target and v["disks"][0]["mirror"]["state"] == "in_sync", v["disks"]


def test_a_mirrored_vm_whose_migration_fails_gets_its_second_copy_back_on_its_host(cluster: Cluster) -> None:
    for p in ("a", "b"):
        assert cluster.api.post("/v1/pools", json={"name": p, "path": str(cluster.tmp / p)}).status_code == 201
    v = cluster.create("pacs", start=True, mirror=["a", "b"])
    source, first = v["host"], v["disks"][0]["path"]
    cluster.drivers[source].fail_next_migration = "the network broke"
    target = ({"h1", "h2", "h3"} - {source}).pop()
    job = cluster.wait(cluster.api.post("/v1/vms/pacs/migrate", json={"to": target}).json()["job"])
    assert job["state"] == "failed" and "the network broke" in job["error"]["message"], job
    v = cluster.api.get("/v1/vms/pacs").json()
    d = v["disks"][0]
    assert v["host"] == source and v["state"] == "running" and d["path"] == first and d["pool"] == "a"
    assert d["mirror"]["state"] == "in_sync" and d["mirror"]["pool"] == "b" and Path(d["mirror"]["path"]).exists()
    assert not list((cluster.tmp / target / "disks").rglob("*.qcow2"))  # nothing left on the destination


def test_a_migration_to_a_host_whose_pool_has_no_room_is_refused_with_nothing_changed(cluster: Cluster) -> None:
    r = cluster.api.post("/v1/pools", json={"name": "ssd", "path": str(cluster.tmp / "ssd"), "capacity": "1G"})
    assert r.status_code == 201, r.text
    a = cluster.create("a", start=True, pool="ssd", disk="700M")
    b = cluster.create("b", start=True, pool="ssd", disk="700M")
    assert a["host"] != b["host"]  # one host's pool holds one of them
    before = cluster.api.get("/v1/vms/a").json()
    r = cluster.api.post("/v1/vms/a/migrate", json={"to": b["host"]})
    assert r.status_code == 409 and "ssd" in r.json()["message"], r.text
    after = cluster.api.get("/v1/vms/a").json()
    assert {k: after[k] for k in ("host", "state", "disks")} == {k: before[k] for k in ("host", "state", "disks")}
    assert not list((cluster.tmp / "ssd" / "a").glob("disk0-2*"))


def test_replicas_of_one_hosts_vms_spread_over_the_other_hosts(cluster: Cluster) -> None:
    """Six replicated VMs started together (one bulk start): each host's two VMs keep their replicas on the two
    other hosts, so a host's failure restarts one VM on each, not both on one (its HA reserve holds)."""
    names = [f"ward{i}" for i in range(6)]
    for n in names:
        cluster.create(n, storage="replicated")
    r = cluster.api.post("/v1/vms/actions/start", json={"names": names})
    assert cluster.wait(r.json()["job"])["state"] == "succeeded"
    vms = [_in_sync(cluster, n) for n in names]
    for host in ("h1", "h2", "h3"):
        mine = [v["replica"]["host"] for v in vms if v["host"] == host]
        assert len(mine) == 2 and len(set(mine)) == 2, (host, mine)
