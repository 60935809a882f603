"""Anti-affinity groups through the API: placement, start, migration and maintenance keep them apart."""

from __future__ import annotations

from tests.functional.conftest import Cluster


def test_group_members_are_placed_on_different_hosts(cluster: Cluster) -> None:
    for n in ("emr-db1", "emr-db2", "emr-db3"):
        cluster.create(n, start=True, anti_affinity="emr-db")
    hosts = {cluster.host_of(n) for n in ("emr-db1", "emr-db2", "emr-db3")}
    assert hosts == {"h1", "h2", "h3"}
    assert cluster.api.get("/v1/vms/emr-db1").json()["anti_affinity"] == "emr-db"


def test_a_fourth_member_is_refused_with_the_reason_and_leaves_nothing(cluster: Cluster) -> None:
    for n in ("db1", "db2", "db3"):
        cluster.create(n, start=True, anti_affinity="db")
    r = cluster.api.post("/v1/vms", json={"name": "db4", "image": "tiny", "start": True, "anti_affinity": "db"})
    assert r.status_code == 409, r.text
    assert "anti-affinity group 'db'" in r.json()["message"]
    assert cluster.api.get("/v1/vms/db4").status_code == 404


def test_a_stopped_member_is_not_started_beside_its_partner(cluster: Cluster) -> None:
    for n in ("db1", "db2", "db3"):
        cluster.create(n, start=True, anti_affinity="db")
    cluster.create("db4", anti_affinity="db")  # defined only: nothing runs yet
    r = cluster.api.post("/v1/vms/db4/actions/start")
    assert r.status_code == 409, r.text
    assert "anti-affinity" in r.json()["message"]
    assert cluster.api.get("/v1/vms/db4").json()["state"] == "stopped"


def test_migration_refuses_a_host_that_runs_a_partner(cluster: Cluster) -> None:
    cluster.create("db1", start=True, anti_affinity="db", storage="shared")
    cluster.create("db2", start=True, anti_affinity="db", storage="shared")
    partner = cluster.host_of("db2")
    r = cluster.api.post("/v1/vms/db1/migrate", json={"to": partner})
    assert r.status_code == 409, r.text
    assert "anti-affinity" in r.json()["message"]
    # without --to the scheduler picks the one host free of the group
    free = ({"h1", "h2", "h3"} - {partner, cluster.host_of("db1")}).pop()
    r = cluster.api.post("/v1/vms/db1/migrate", json={})
    assert cluster.wait(r.json()["job"])["state"] == "succeeded"
    assert cluster.host_of("db1") == free


def test_maintenance_refuses_when_the_group_has_nowhere_to_go(cluster: Cluster) -> None:
    for n in ("db1", "db2", "db3"):
        cluster.create(n, start=True, anti_affinity="db", storage="shared")
    r = cluster.api.post("/v1/hosts/h1/maintenance", json={"on": True})
    assert r.status_code == 409, r.text
    assert "anti-affinity" in r.json()["message"]
    hosts = cluster.api.get("/v1/hosts").json()
    assert all(h["state"] != "maintenance" for h in hosts)


def test_bad_group_name_is_refused(cluster: Cluster) -> None:
    r = cluster.api.post("/v1/vms", json={"name": "x", "image": "tiny", "anti_affinity": "../etc"})
    assert r.status_code == 422, r.text
    assert "anti_affinity" in r.json()["message"]


def test_vms_made_stopped_spread_over_the_hosts(cluster: Cluster) -> None:
    """Six VMs defined before any starts (an import, a plan applied): two on each host, not six on the emptiest."""
    for i in range(6):
        cluster.create(f"ward{i}")
    hosts = [cluster.host_of(f"ward{i}") for i in range(6)]
    assert sorted(hosts.count(h) for h in ("h1", "h2", "h3")) == [2, 2, 2], hosts
