"""``kasou plan apply`` against the in-process API with the fake driver: all VMs or none."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from kasou.api.client import Client
from kasou.cli import common
from kasou.cli import main as cli
from kasou.planner import Options, PriceSheet, make_plan, parse_prices
from kasou.planner.inventory import Server
from tests.cli_errors import error_of
from tests.functional.conftest import TOKEN, Cluster, Env

SMALL = parse_prices(
    '[policy]\nmin_memory_gib = 1\nmin_vcpus = 1\nmin_hosts = 1\n[[host_models]]\nname = "lab"\ncores = 4\n'
    "clock_ghz = 2\nmemory_gib = 8\niops = 100000\nrack_u = 1\nprice_yen = 1000000\nidle_w = 50\nmax_w = 100\n",
    "small",
)


def server(name: str, group: str | None = None, crit: str = "24h-clinical", gib: float = 0.5) -> Server:
    return Server(name=name, department=f"{name} dept", vendor="v", cores=1, clock_ghz=2, memory_gib=gib,
                  disk_gib=1, iops=10, cpu_peak_pct=20, cpu_avg_pct=5, mem_peak_pct=50, mem_avg_pct=30,
                  criticality=crit, power_w=100, age_years=3, maint_yen_per_year=0, anti_affinity=group)  # fmt: skip


def write_plan(tmp_path: Path, servers: list[Server], prices: PriceSheet = SMALL) -> Path:
    plan = make_plan(servers, prices, Options(reserve=0, runs=5, time_limit=2, workers=1))
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(plan))
    return path


@pytest.fixture
def run(env: Env) -> Iterator[Any]:
    runner = CliRunner()

    def invoke(*args: str) -> Any:
        return runner.invoke(cli.app, list(args), catch_exceptions=True)

    common.client_factory = lambda: Client("http://testserver", TOKEN, http=env.api)
    try:
        yield invoke
    finally:
        common.client_factory = None


def vm_names(env: Env) -> list[str]:
    return sorted(v["name"] for v in env.api.get("/v1/vms").json())


def test_apply_defines_every_planned_vm_stopped(env: Env, run: Any, tmp_path: Path) -> None:
    path = write_plan(tmp_path, [server("emr"), server("lab", crit="business-hours"), server("dwh", crit="batch")])
    r = run("plan", "apply", str(path))
    assert r.exit_code == 0, r.output
    assert "3 VMs defined (stopped)" in r.output
    assert vm_names(env) == ["dwh", "emr", "lab"]
    emr = env.api.get("/v1/vms/emr").json()
    assert (emr["state"], emr["memory_mib"], emr["vcpus"], emr["ha"], emr["priority"]) == ("stopped", 1024, 1, True, 90)
    assert env.api.get("/v1/vms/dwh").json()["priority"] == 10
    assert [env.api.get(f"/v1/vms/{n}").json()["criticality"] for n in ("emr", "lab", "dwh")] == [
        "24h-clinical", "business-hours", "batch"]  # fmt: skip
    assert env.api.get("/v1/vms/emr/backup-policy").json()["keep"] == 5  # the criticality's default
    # Applying again: every name exists, nothing is touched.
    r = run("plan", "apply", str(path))
    assert r.exit_code == 4  # a conflict
    assert error_of(r).startswith("3 VM name(s) of the plan exist already: ")
    assert error_of(r).endswith("; nothing created")
    assert vm_names(env) == ["dwh", "emr", "lab"]


def test_a_failed_create_removes_what_the_apply_made(env: Env, run: Any, tmp_path: Path) -> None:
    # Planned for big hosts; this environment's one host (this machine) cannot define the 2 TiB VM, made last.
    big = SMALL.replace(host_models=(SMALL.host_models[0].__class__(**{**SMALL.host_models[0].__dict__,
                                                                      "memory_gib": 4096}),))  # fmt: skip
    path = write_plan(tmp_path, [server("a-first"), server("b-second"), server("z-big", gib=2048)], big)
    r = run("plan", "apply", str(path), "--no-disks")
    msg = error_of(r)
    assert msg.startswith("creating z-big failed: ") and msg.endswith("removed the 2 VM(s) this apply had made")
    assert vm_names(env) == []


def test_bad_plans_are_refused_before_anything(env: Env, run: Any, tmp_path: Path) -> None:
    path = write_plan(tmp_path, [server("ok")])
    plan = json.loads(path.read_text())
    plan["hosts"][0]["vms"][0]["name"] = "bad name"
    path.write_text(json.dumps(plan))
    r = run("plan", "apply", str(path))
    assert "VM 'bad name' in the plan" in error_of(r) and r.exit_code == 2
    path.write_text("{not json")
    r = run("plan", "apply", str(path))
    assert "is not readable JSON" in error_of(r)
    path.write_text(json.dumps({"hosts": []}))
    r = run("plan", "apply", str(path))
    assert "unknown plan version" in error_of(r)
    assert vm_names(env) == []


def test_ha_with_local_disks_in_a_cluster_is_refused_before_anything(cluster: Cluster, tmp_path: Path) -> None:
    runner = CliRunner()
    common.client_factory = lambda: Client("http://testserver", TOKEN, http=cluster.api)
    try:
        path = write_plan(tmp_path, [server("emr"), server("lab")])
        r = runner.invoke(cli.app, ["plan", "apply", str(path)], catch_exceptions=True)
        assert "--storage replicated" in error_of(r) and "nothing created" in error_of(r)
        assert cluster.api.get("/v1/vms").json() == []
        r = runner.invoke(cli.app, ["plan", "apply", str(path), "--storage", "shared", "--no-disks"])
        assert r.exit_code == 0, r.output
        assert all(v["ha"] and v["storage"] == "shared" for v in cluster.api.get("/v1/vms").json())
    finally:
        common.client_factory = None
