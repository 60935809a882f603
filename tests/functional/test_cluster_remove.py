"""``kasou cluster remove``: a host that is gone for good taken out of the cluster from another host, with the
in-process API on three fake hosts and etcd's membership a stand-in (the real one: tests/integration/
test_cluster_join.py)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from kasou.control.hosts import Agents
from kasou.control.membership import mark_removed
from kasou.store.sqlite import SqliteStore
from tests.functional.conftest import TOKEN, Cluster, client_of
from tests.functional.test_cluster_join_api import FakeMembers, join_body, make_site


@pytest.fixture
def members(cluster: Cluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FakeMembers:
    fake = make_site(cluster.services, tmp_path, monkeypatch, "h1", "10.0.0.1")
    fake.members = [
        {"id": i, "name": h, "peer_urls": [f"https://10.0.0.{i}:2380"], "client_urls": [f"https://10.0.0.{i}:2379"]}
        for i, h in enumerate(["h1", "h2", "h3"], 1)
    ]
    return fake


def test_a_dead_host_is_removed_only_once_it_is_down_and_holds_no_vm(cluster: Cluster, members: FakeMembers) -> None:
    cluster.create("emr1")
    busy = cluster.host_of("emr1")
    empty = next(h for h in ("h1", "h2", "h3") if h != busy)
    r = cluster.api.post("/v1/cluster/remove", json={"host": empty})
    assert r.status_code == 409 and f"run kasou cluster leave on {empty}" in r.json()["message"], r.text

    cluster.fail_host(busy)  # its lease expired: the stopped VM is recorded there, and would be lost with it
    r = cluster.api.post("/v1/cluster/remove", json={"host": busy})
    assert r.status_code == 409 and "emr1" in r.json()["message"] and "--drop-vms" in r.json()["message"]
    assert len(members.members) == 3

    cluster.fail_host(empty)
    events, call = cluster.services.vms.events, cluster.api.portal.call  # type: ignore[union-attr]
    call(events.raise_once, f"host-down/{empty}", "host_down", f"host/{empty}", "down", "critical")
    r = cluster.api.post("/v1/cluster/remove", json={"host": empty})
    assert r.status_code == 200, r.text
    left = sorted(m["name"] for m in r.json()["members"])
    assert left == sorted({"h1", "h2", "h3"} - {empty}) and len(members.members) == 2
    assert empty not in [h["name"] for h in cluster.api.get("/v1/hosts").json()]
    assert f"host-down/{empty}" not in call(events.active_keys)
    kinds = [e["kind"] for e in cluster.api.get("/v1/events").json()]
    assert "host_removed" in kinds
    r = cluster.api.post("/v1/cluster/remove", json={"host": empty})
    assert r.status_code == 404 and f"no host {empty}" in r.json()["message"]
    assert cluster.api.post("/v1/cluster/remove", json={"host": "../h1"}).status_code == 422

    # A new machine under the removed name joins with a token: the name counts again.
    token = cluster.api.post("/v1/cluster/tokens").json()["token"]
    r = cluster.api.post("/v1/cluster/join", json=join_body(token, empty, "10.0.0.42"))
    assert r.status_code == 200, r.text
    assert call(cluster.services.store.get, f"cluster/removed/{empty}") is None


def test_only_administrators_remove_hosts(cluster: Cluster, members: FakeMembers) -> None:
    anon = client_of(cluster.api)
    anon.headers.pop("Authorization", None)
    assert anon.post("/v1/cluster/remove", json={"host": "h2"}).status_code == 401
    assert len(members.members) == 3


def test_the_control_plane_ignores_a_removed_hosts_record(tmp_path: Path) -> None:
    async def run() -> tuple[list[str], list[str], list[str]]:
        store = SqliteStore(tmp_path / "state.db")
        for h in ("h1", "h2"):
            await store.put(f"hosts/{h}", {"name": h, "agent_url": f"https://10.0.0.{h[1]}:8471"})
        agents = Agents(store=store)
        await agents.refresh(force=True)
        before = agents.names()
        await mark_removed(store, "h2", "admin")  # the old machine still publishes its record
        fresh = Agents(store=store)
        await fresh.refresh(force=True)
        agents.forget("h2")
        await agents.refresh(force=True)
        out = before, fresh.names(), agents.known()
        await agents.close()
        await fresh.close()
        await store.close()
        return out

    before, fresh, known = asyncio.run(run())
    assert before == ["h1", "h2"] and fresh == ["h1"] and known == ["h1"]


def test_the_cli_removes_a_dead_host_and_says_what_it_could_not_revoke(cluster: Cluster, members: FakeMembers) -> None:
    from typer.testing import CliRunner

    from kasou.api.client import Client
    from kasou.cli import common, main

    common.client_factory = lambda: Client("http://testserver", TOKEN, http=cluster.api)
    try:
        runner = CliRunner()
        r = runner.invoke(main.app, ["cluster", "remove", "h3"])
        assert r.exit_code == 4 and "run kasou cluster leave on h3" in r.output, r.output  # 4: a conflict
        cluster.fail_host("h3")
        r = runner.invoke(main.app, ["cluster", "remove", "h3"])
        assert r.exit_code == 0, r.output
        assert "members left (2): h1, h2" in r.output and "h3 is forgotten" in r.output
        assert "no certificate of h3 was recorded" in r.output  # set up without kasou cluster join
        assert "3 members survive the loss of any one" in r.output  # two members left: the quorum note
        r = runner.invoke(main.app, ["cluster", "remove", "h3"])
        assert r.exit_code == 3 and "no host h3" in r.output  # 3: not found
    finally:
        common.client_factory = None


def test_the_cli_prints_what_remove_did_for_a_script(cluster: Cluster, members: FakeMembers) -> None:
    import json

    from typer.testing import CliRunner

    from kasou.api.client import Client
    from kasou.cli import common, main

    common.client_factory = lambda: Client("http://testserver", TOKEN, http=cluster.api)
    try:
        cluster.fail_host("h2")
        r = CliRunner().invoke(main.app, ["cluster", "remove", "h2", "-o", "json"])
        assert r.exit_code == 0, r.output
        out = json.loads(r.output)
        assert sorted(m["name"] for m in out["members"]) == ["h1", "h3"] and out["revoked"] == []
    finally:
        common.client_factory = None


def test_drop_vms_moves_a_replicated_vm_to_its_replica_and_drops_the_others(
    cluster: Cluster, members: FakeMembers
) -> None:
    from tests.functional.test_api_replication import _in_sync

    cluster.create("pacs", start=True, storage="replicated")
    v = _in_sync(cluster, "pacs")
    gone, replica_host = v["host"], v["replica"]["host"]
    local = None
    for i in range(6):  # a VM with its disk on the same host
        cluster.create(f"lab{i}")
        if cluster.host_of(f"lab{i}") == gone:
            local = f"lab{i}"
            break
    assert local is not None
    cluster.fail_host(gone)
    r = cluster.api.post("/v1/cluster/remove", json={"host": gone})
    assert r.status_code == 409 and "pacs" in r.json()["message"] and "--drop-vms" in r.json()["message"], r.text
    r = cluster.api.post("/v1/cluster/remove", json={"host": gone, "drop_vms": True})
    assert r.status_code == 200, r.text
    lost = {x["vm"]: x for x in r.json()["lost_vms"]}
    assert lost["pacs"]["moved_to"] == replica_host and lost["pacs"]["replica_state"] == "in_sync"
    assert lost[local]["moved_to"] is None and set(lost) == {"pacs", local}
    v = cluster.api.get("/v1/vms/pacs").json()
    assert v["host"] == replica_host and v["state"] == "stopped" and v["disks"][0]["path"].endswith("replica.qcow2")
    assert cluster.api.get(f"/v1/vms/{local}").status_code == 404
    history = cluster.api.get("/v1/vms/pacs/history").json()
    assert f"host {gone} was removed" in history[-1]["detail"] and "moved, stopped" in history[-1]["detail"]
    # The moved VM starts on its new host from the promoted copy, and gets a replica again.
    assert cluster.wait(cluster.api.post("/v1/vms/pacs/actions/start").json()["job"])["state"] == "succeeded"
    v = _in_sync(cluster, "pacs")
    assert v["host"] == replica_host and v["replica"]["host"] not in (gone, replica_host)
