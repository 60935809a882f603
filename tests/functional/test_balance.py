"""The load balancer with fake hosts: ``POST /v1/cluster/balance`` (dry run and job), its settings, recommend and
automatic mode, ``kasou cluster balance``; and maintenance spreading a host's VMs over the others by load."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
from typer.testing import CliRunner

from kasou.api.client import Client
from kasou.cli import common
from kasou.cli import main as cli
from tests.functional.conftest import TOKEN, Cluster

MIB = 2048  # memory of each test VM: four on one host make a spread of about 35 points (24 GiB hosts)


def _skewed(cluster: Cluster, n: int = 4, host: str = "h1", **kw: Any) -> list[str]:
    """``n`` running VMs on shared storage, all moved onto ``host``."""
    names = [f"vm{i}" for i in range(n)]
    for name in names:
        cluster.create(name, start=True, storage=kw.get("storage", "shared"), memory_mib=MIB)
        if cluster.host_of(name) != host:
            job = cluster.wait(cluster.api.post(f"/v1/vms/{name}/migrate", json={"to": host}).json()["job"])
            assert job["state"] == "succeeded", job["error"]
    return names


def _set(cluster: Cluster, **changes: Any) -> dict[str, Any]:
    s = cluster.api.get("/v1/cluster/balance/settings").json()
    r = cluster.api.put("/v1/cluster/balance/settings", json={**s, **changes})
    assert r.status_code == 200, r.text
    return dict(r.json())


def _hosts(cluster: Cluster, names: list[str]) -> Counter[str]:
    return Counter(cluster.host_of(n) for n in names)


def test_a_dry_run_plans_moves_with_reasons_and_moves_nothing(cluster: Cluster) -> None:
    names = _skewed(cluster)
    _set(cluster, threshold=10)
    r = cluster.api.post("/v1/cluster/balance", json={"dry_run": True})
    assert r.status_code == 202, r.text
    res = r.json()
    assert res["job"] is None
    plan = res["plan"]
    assert plan["spread_before"]["memory"] > 10 >= plan["spread_after"]["memory"]
    assert plan["moves"] and all(m["source"] == "h1" and m["target"] in ("h2", "h3") for m in plan["moves"])
    first = plan["moves"][0]
    assert "memory pressure h1" in first["reason"] and first["spread_after"] < first["spread_before"]
    assert _hosts(cluster, names) == {"h1": 4}


def test_balance_runs_the_moves_as_one_job_and_a_second_round_moves_nothing(cluster: Cluster) -> None:
    names = _skewed(cluster)
    _set(cluster, threshold=10)
    res = cluster.api.post("/v1/cluster/balance", json={}).json()
    planned = {m["vm"]: m["target"] for m in res["plan"]["moves"]}
    job = cluster.wait(res["job"])
    assert job["kind"] == "balance" and job["state"] == "succeeded", job["error"]
    rows = job["result"]["moves"]
    assert {r["vm"]: r["to"] for r in rows} == planned and all(r["ok"] for r in rows)
    where = _hosts(cluster, names)
    assert set(where) == {"h1", "h2", "h3"} and max(where.values()) - min(where.values()) <= 1, where
    again = cluster.api.post("/v1/cluster/balance", json={}).json()
    assert again["job"] is None and again["plan"]["moves"] == []  # balanced: nothing moves back
    # Skewed again by hand: the VMs the balancer moved stay in their cool-down; only the others may move.
    moved = set(planned)
    for n in names:
        if cluster.host_of(n) != "h1":
            cluster.wait(cluster.api.post(f"/v1/vms/{n}/migrate", json={"to": "h1"}).json()["job"])
    plan = cluster.api.post("/v1/cluster/balance", json={"dry_run": True}).json()["plan"]
    assert not {m["vm"] for m in plan["moves"]} & moved
    assert all("cool-down" in plan["held"][n] for n in moved)


def test_vms_with_local_disks_are_held_and_say_why_unless_allowed(cluster: Cluster) -> None:
    _skewed(cluster, storage="local")
    _set(cluster, threshold=10)
    plan = cluster.api.post("/v1/cluster/balance", json={"dry_run": True}).json()["plan"]
    assert plan["moves"] == []
    assert "local to h1" in plan["held"]["vm0"] and "local_disks" in plan["held"]["vm0"]
    assert "may not move" in plan["summary"]
    _set(cluster, local_disks=True)
    plan = cluster.api.post("/v1/cluster/balance", json={"dry_run": True}).json()["plan"]
    assert plan["moves"]


def test_hosts_in_maintenance_take_nothing(cluster: Cluster) -> None:
    names = _skewed(cluster)
    _set(cluster, threshold=10)
    cluster.api.post("/v1/hosts/h3/maintenance", params={"on": True})
    res = cluster.api.post("/v1/cluster/balance", json={}).json()
    assert res["plan"]["excluded"] == {"h3": "in maintenance"}
    assert all(m["target"] == "h2" for m in res["plan"]["moves"])
    assert cluster.wait(res["job"])["state"] == "succeeded"
    assert _hosts(cluster, names) == {"h1": 2, "h2": 2}


def test_at_most_max_parallel_migrations_at_once(cluster: Cluster) -> None:
    names = _skewed(cluster, n=6)
    _set(cluster, threshold=5, max_parallel=1)
    running: list[int] = [0, 0]  # now, most
    for drv in cluster.drivers.values():
        real_prepare, real_finish = drv.prepare_incoming, drv.finish_incoming

        async def prepare(*a: Any, _real: Any = real_prepare, **kw: Any) -> Any:
            running[0] += 1
            running[1] = max(running[1], running[0])
            return await _real(*a, **kw)

        async def finish(*a: Any, _real: Any = real_finish, **kw: Any) -> Any:
            running[0] -= 1
            return await _real(*a, **kw)

        drv.prepare_incoming = prepare  # type: ignore[method-assign]
        drv.finish_incoming = finish  # type: ignore[method-assign]
    job = cluster.wait(cluster.api.post("/v1/cluster/balance", json={}).json()["job"])
    assert job["state"] == "succeeded", job["error"]
    assert len(job["result"]["moves"]) >= 3 and running[1] == 1
    assert len(set(_hosts(cluster, names))) == 3


def test_settings_are_checked_and_kept(cluster: Cluster) -> None:
    s = cluster.api.get("/v1/cluster/balance/settings").json()
    assert s["mode"] == "off" and s["threshold"] == 20 and s["max_parallel"] == 2
    bad = cluster.api.put("/v1/cluster/balance/settings", json={**s, "mode": "sometimes"})
    assert bad.status_code == 422 and "mode" in bad.text
    assert cluster.api.put("/v1/cluster/balance/settings", json={**s, "threshold": 0}).status_code == 422
    assert cluster.api.get("/v1/cluster/balance/settings").json() == s  # nothing changed
    _set(cluster, mode="recommend", threshold=15, cooldown_s=60)
    s = cluster.api.get("/v1/cluster/balance/settings").json()
    assert (s["mode"], s["threshold"], s["cooldown_s"]) == ("recommend", 15, 60)


def test_recommend_mode_raises_an_info_event_with_the_moves(cluster: Cluster) -> None:
    names = _skewed(cluster)
    _set(cluster, mode="recommend", threshold=10, interval_s=10)

    def event() -> Any:
        return [e for e in cluster.api.get("/v1/events").json() if e["kind"] == "balance_recommended"]

    ev = cluster.wait_for("the recommendation", event)[0]
    assert ev["severity"] == "info" and "h1 →" in ev["message"] and "kasou cluster balance" in ev["message"]
    assert _hosts(cluster, names) == {"h1": 4}  # recommended only


def test_automatic_mode_moves_the_vms(cluster: Cluster) -> None:
    names = _skewed(cluster)
    _set(cluster, mode="automatic", threshold=10, interval_s=10)
    cluster.wait_for("the VMs spread", lambda: len(set(_hosts(cluster, names))) == 3)
    jobs = [j for j in cluster.api.get("/v1/jobs").json() if j["kind"] == "balance"]
    cluster.wait_for("the job's end", lambda: cluster.api.get(f"/v1/jobs/{jobs[0]['id']}").json()["state"] != "running")


def test_maintenance_spreads_a_hosts_vms_over_the_remaining_hosts_by_load(cluster: Cluster) -> None:
    names = _skewed(cluster, n=4)
    r = cluster.api.post("/v1/hosts/h1/maintenance", params={"on": True})
    job = cluster.wait(r.json()["job"])
    assert job["state"] == "succeeded", job["error"]
    assert set(job["result"]["plan"].values()) == {"h2", "h3"}
    assert _hosts(cluster, names) == {"h2": 2, "h3": 2}


# -- the CLI ------------------------------------------------------------------------------------


@pytest.fixture
def run(cluster: Cluster) -> Iterator[Any]:
    runner = CliRunner()

    def invoke(*args: str) -> Any:
        return runner.invoke(cli.app, list(args), catch_exceptions=True)

    common.client_factory = lambda: Client("http://testserver", TOKEN, http=cluster.api)
    try:
        yield invoke
    finally:
        common.client_factory = None


def test_cli_cluster_still_shows_the_cluster_and_balance_prints_plan_and_results(cluster: Cluster, run: Any) -> None:
    r = run("cluster")
    assert r.exit_code == 0 and "hosts up: h1, h2, h3" in r.output, r.output
    names = _skewed(cluster)
    r = run("cluster", "balance-settings", "--threshold", "10", "--max-parallel", "1")
    assert r.exit_code == 0 and "threshold=10.0" in r.output and "max_parallel=1" in r.output, r.output
    r = run("cluster", "balance", "--dry-run")
    assert r.exit_code == 0, r.output
    assert "vm" in r.output and "h1" in r.output and "memory" in r.output and "balanced" in r.output
    assert _hosts(cluster, names) == {"h1": 4}
    r = run("cluster", "balance")
    assert r.exit_code == 0, r.output
    assert r.output.count("moved h1 →") >= 2
    r = run("cluster", "balance", "--json", "--dry-run")
    assert json.loads(r.output)["plan"]["moves"] == []
    assert run("cluster", "balance-settings", "--mode", "sometimes").exit_code != 0
