"""``kasou host shutdown-guests`` (kasou.cli.host_shutdown), the command of kasou-guests.service: at the host's
shutdown its VMs move away (a cluster) or shut down gracefully in the reverse of the start-up order; never when
the system is not shutting down."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from kasou.api.client import Client
from kasou.cli import common
from kasou.cli.main import app as cli_app
from tests.functional.conftest import TOKEN, Cluster, Env


@pytest.fixture
def systemctl(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A fake systemctl on PATH; write what ``is-system-running`` says into the returned file."""
    state = tmp_path / "system-state"
    state.write_text("running")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "systemctl").write_text(f'#!/bin/sh\ncat "{state}"\n')
    (bin_dir / "systemctl").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{Path('/usr/bin')}:{Path('/bin')}")
    yield state


def cli(env: Env | Cluster, *args: str, code: int = 0) -> str:
    common.client_factory = lambda: Client("http://testserver", TOKEN, http=env.api)
    try:
        r = CliRunner().invoke(cli_app, list(args))
    finally:
        common.client_factory = None
    assert r.exit_code == code, (args, r.output)
    return r.output


def states(env: Env | Cluster) -> dict[str, str]:
    return {v["name"]: v["state"] for v in env.api.get("/v1/vms").json()}


def test_a_single_host_shuts_its_vms_down_in_reverse_start_up_order_and_stops_a_paused_one(
    env: Env, systemctl: Path
) -> None:
    env.create("db", startup={"onboot": True, "order": 1}, start=True)
    env.create("app", startup={"onboot": True, "order": 2}, start=True)
    env.create("misc", start=True)
    env.create("held", start=True)
    env.wait(env.api.post("/v1/vms/held/actions/pause").json()["job"])
    host = env.api.get("/v1/vms/db").json()["host"]
    # not a system shutdown (a restart of the unit, an upgrade): nothing happens
    out = cli(env, "host", "shutdown-guests", "--if-system-stopping")
    assert "the system is not shutting down (systemctl is-system-running: running): VMs left running" in out
    assert set(states(env).values()) == {"running", "paused"}
    systemctl.write_text("stopping")
    out = cli(env, "host", "shutdown-guests", "--if-system-stopping", "--host", host)
    assert "no other host up" not in out  # a single host: nothing to move to, and nothing said of it
    assert "shutdown: 3 succeeded, 0 failed" in out and "stop: 1 succeeded" in out, out
    assert set(states(env).values()) == {"stopped"}
    jobs = [j for j in env.api.get("/v1/jobs").json() if j.get("kind", "").startswith("bulk")]
    groups = [j["result"].get("groups") for j in jobs if j.get("result") and j["result"].get("groups")]
    assert [["misc"], ["app"], ["db"]] in groups, groups  # the application before its database
    assert "no VM runs here" in cli(env, "host", "shutdown-guests", "--host", host)
    cli(env, "host", "shutdown-guests", "--timeout", "1", code=2)


def test_in_a_cluster_the_host_enters_maintenance_and_its_vms_move(cluster: Cluster) -> None:
    for n in ("emr", "pacs"):
        cluster.create(n, start=True)
    src = cluster.host_of("emr")
    if cluster.host_of("pacs") != src:
        cluster.wait(cluster.api.post("/v1/vms/pacs/migrate", json={"to": src}).json()["job"])
    out = cli(cluster, "host", "shutdown-guests", "--host", src)
    assert f"host {src}: in maintenance, 2 VMs moved" in out and f"kasou host maintenance {src} --off" in out, out
    for n in ("emr", "pacs"):
        v = cluster.api.get(f"/v1/vms/{n}").json()
        assert v["state"] == "running" and v["host"] != src, v
