"""Snapshots through the API with the fake driver (real qcow2 files made by qemu-img): the rules and bad input."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from kasou.api.client import Client
from kasou.cli import common
from kasou.cli import main as cli
from tests.cli_errors import error_of
from tests.functional.conftest import TOKEN, Cluster, Env


def backing(path: str | Path) -> str | None:
    r = subprocess.run(["qemu-img", "info", "-U", "--output=json", str(path)], capture_output=True, timeout=30)
    info = json.loads(r.stdout)
    return info.get("full-backing-filename") or info.get("backing-filename")


def snap(env: Env, vm: str, name: str, memory: bool = False) -> dict[str, Any]:
    r = env.api.post(f"/v1/vms/{vm}/snapshots", json={"name": name, "memory": memory})
    assert r.status_code == 202, r.text
    return env.wait(r.json()["job"])


def files(env: Env) -> list[str]:
    return sorted(p.name for p in (env.tmp / "disks").rglob("*") if p.is_file())


def disk_path(env: Env, vm: str) -> str:
    return str(env.api.get(f"/v1/vms/{vm}").json()["disks"][0]["path"])


def test_snapshot_list_revert_delete_of_a_running_vm(env: Env) -> None:
    env.create("emr", start=True)
    base = disk_path(env, "emr")
    job = snap(env, "emr", "before-upgrade", memory=True)
    assert job["state"] == "succeeded", job
    assert job["result"]["live"] and job["result"]["memory"]
    overlay = disk_path(env, "emr")
    assert overlay.endswith("disk0.before-upgrade.qcow2") and backing(overlay) == base
    assert files(env) == ["before-upgrade.vmstate", "disk0.before-upgrade.qcow2", "disk0.qcow2"]

    [s] = env.api.get("/v1/vms/emr/snapshots").json()
    assert (s["name"], s["memory"], s["newest"], s["state"], s["vm_state"]) == (
        "before-upgrade", True, True, "ready", "running",
    )  # fmt: skip
    assert s["memory_bytes"] > 0 and s["size_bytes"] >= s["memory_bytes"]
    assert env.api.get("/v1/vms/emr/snapshots/before-upgrade").json()["name"] == "before-upgrade"

    # Revert of a memory snapshot: the guest runs on from the saved state (the fake keeps its uptime).
    env.driver._set("emr", env.driver.vms["emr"].state, guest_uptime_s=999.0)
    r = env.api.post("/v1/vms/emr/snapshots/before-upgrade/revert")
    assert r.status_code == 202, r.text
    job = env.wait(r.json()["job"])
    assert job["state"] == "succeeded" and job["result"]["state"] == "running", job
    vm = env.api.get("/v1/vms/emr").json()
    assert vm["state"] == "running" and vm["disks"][0]["path"] == overlay and vm["uptime_s"] != 999.0
    events = [e["event"] for e in env.api.get("/v1/vms/emr/history").json()]
    assert events[-2:] == ["stopped", "started"]

    # A second, disk-only snapshot; then delete the first (an intermediate merge) and the second (the active one).
    assert snap(env, "emr", "s2")["state"] == "succeeded"
    top = disk_path(env, "emr")
    assert backing(top) == overlay
    r = env.api.delete("/v1/vms/emr/snapshots/before-upgrade")
    assert r.status_code == 202 and env.wait(r.json()["job"])["state"] == "succeeded"
    assert backing(top) == base and files(env) == ["disk0.qcow2", "disk0.s2.qcow2"]
    [s2] = env.api.get("/v1/vms/emr/snapshots").json()
    assert s2["name"] == "s2" and s2["newest"]
    assert env.wait(env.api.delete("/v1/vms/emr/snapshots/s2").json()["job"])["state"] == "succeeded"
    assert disk_path(env, "emr") == base and files(env) == ["disk0.qcow2"]
    assert env.api.get("/v1/vms/emr/snapshots").json() == []
    assert env.driver.specs["emr"].disks[0].path == base  # the running QEMU's view
    assert env.api.get("/v1/vms/emr").json()["state"] == "running"


def test_stopped_vm_snapshots_with_qemu_img_and_a_restart_boots_the_right_chain(env: Env) -> None:
    env.create("lab")
    base = disk_path(env, "lab")
    assert snap(env, "lab", "s1")["result"]["live"] is False
    overlay = disk_path(env, "lab")
    assert backing(overlay) == base
    assert env.act("lab", "start")["state"] == "succeeded"
    assert env.driver.specs["lab"].disks[0].path == overlay  # started on the active layer
    assert env.act("lab", "stop")["state"] == "succeeded"

    # Disk-only revert of a stopped VM: the overlay is made anew; the VM stays stopped.
    Path(overlay).write_bytes(b"")  # what the guest wrote since (any content): gone after the revert
    job = env.wait(env.api.post("/v1/vms/lab/snapshots/s1/revert").json()["job"])
    assert job["state"] == "succeeded" and job["result"]["state"] == "stopped", job
    assert backing(overlay) == base and Path(overlay).stat().st_size > 0

    assert env.wait(env.api.delete("/v1/vms/lab/snapshots/s1").json()["job"])["state"] == "succeeded"
    assert disk_path(env, "lab") == base and files(env) == ["disk0.qcow2"]


def test_disk_only_revert_of_a_running_vm_restarts_it(env: Env) -> None:
    env.create("pacs", start=True)
    snap(env, "pacs", "s1")
    pid = env.driver.vms["pacs"].pid
    job = env.wait(env.api.post("/v1/vms/pacs/snapshots/s1/revert").json()["job"])
    assert job["state"] == "succeeded" and job["result"]["state"] == "running", job
    assert env.driver.vms["pacs"].pid != pid  # a new QEMU, booted from the reverted disk


def test_bad_input_changes_nothing(env: Env) -> None:
    env.create("emr", start=True)
    snap(env, "emr", "s1")
    snap(env, "emr", "s2")
    before_files, before_vm = files(env), env.api.get("/v1/vms/emr").json()

    def refused(r: Any, status: int, words: str) -> None:
        assert r.status_code == status, r.text
        assert words in r.json()["message"], r.json()
        assert "\n" not in r.json()["message"]

    for bad in ("a/b", "../x", "", ".hidden", "x" * 64, "a b"):
        refused(env.api.post("/v1/vms/emr/snapshots", json={"name": bad}), 422, "snapshot")
    refused(env.api.post("/v1/vms/emr/snapshots", json={"name": "s3", "bogus": 1}), 422, "bogus")
    refused(env.api.post("/v1/vms/emr/snapshots", json={"name": "s1"}), 409, "already has a snapshot named 's1'")
    refused(env.api.post("/v1/vms/nope/snapshots", json={"name": "s3"}), 404, "no VM named 'nope'")
    refused(env.api.get("/v1/vms/nope/snapshots"), 404, "no VM named 'nope'")
    refused(env.api.post("/v1/vms/emr/snapshots/zz/revert"), 404, "no snapshot 'zz'")
    refused(env.api.delete("/v1/vms/emr/snapshots/zz"), 404, "no snapshot 'zz'")
    refused(env.api.get("/v1/vms/emr/snapshots/zz"), 404, "no snapshot 'zz'")
    refused(env.api.post("/v1/vms/emr/snapshots/s1/revert"), 409, "not the newest")
    refused(env.api.post("/v1/vms/emr/snapshots/..x/revert"), 422, "snapshot")
    assert env.act("emr", "pause")["state"] == "succeeded"
    refused(env.api.post("/v1/vms/emr/snapshots", json={"name": "m", "memory": True}), 409, "resume it first")
    assert env.act("emr", "stop")["state"] == "succeeded"
    refused(env.api.post("/v1/vms/emr/snapshots", json={"name": "m", "memory": True}), 409, "needs a running guest")
    assert files(env) == before_files
    after = env.api.get("/v1/vms/emr").json()
    assert after["disks"] == before_vm["disks"] and after["job"] is None
    assert [s["name"] for s in env.api.get("/v1/vms/emr/snapshots").json()] == ["s1", "s2"]

    # A template: linked clones rest on its disks.
    env.create("base")
    assert env.api.post("/v1/vms/base/template").status_code == 200
    refused(env.api.post("/v1/vms/base/snapshots", json={"name": "s1"}), 409, "template")


def test_a_failed_snapshot_leaves_nothing(env: Env) -> None:
    env.create("emr", start=True)
    before_files, before_vm = files(env), env.api.get("/v1/vms/emr").json()
    env.driver.fail_next_snapshot = "Permission denied"
    job = snap(env, "emr", "s1", memory=True)
    assert job["state"] == "failed" and "Permission denied" in job["error"]["message"]
    after = env.api.get("/v1/vms/emr").json()
    assert files(env) == before_files and after["disks"] == before_vm["disks"]
    assert after["state"] == "running" and after["job"] is None
    assert env.api.get("/v1/vms/emr/snapshots").json() == []


def test_vm_delete_removes_every_layer_and_state_file(env: Env) -> None:
    env.create("emr", start=True)
    snap(env, "emr", "s1", memory=True)
    snap(env, "emr", "s2")
    assert len(files(env)) == 4
    r = env.api.delete("/v1/vms/emr", params={"force": True})
    assert env.wait(r.json()["job"])["state"] == "succeeded"
    assert files(env) == []


def test_a_vm_with_snapshots_is_not_migrated(cluster: Cluster) -> None:
    cluster.create("emr", start=True)
    r = cluster.api.post("/v1/vms/emr/snapshots", json={"name": "s1"})
    assert cluster.wait(r.json()["job"])["state"] == "succeeded"
    r = cluster.api.post("/v1/vms/emr/migrate", json={})
    assert r.status_code == 409 and "has snapshots" in r.json()["message"], r.text


# -- the CLI ------------------------------------------------------------------------------------


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


def test_cli_snapshot_create_list_revert_delete(env: Env, run: Any) -> None:
    env.create("emr", start=True)
    r = run("snapshot", "create", "emr", "s1", "--memory")
    assert r.exit_code == 0 and r.output.startswith("vm emr: snapshot s1 taken (disk and memory"), r.output
    assert run("snapshot", "create", "emr", "s2").output.strip() == (
        "vm emr: snapshot s2 taken (disk, crash-consistent: no guest agent answered to freeze its file systems)"
    )
    listed = json.loads(run("snapshot", "list", "emr", "--json").output)
    assert [(s["name"], s["memory"], s["newest"]) for s in listed] == [("s1", True, False), ("s2", False, True)]
    table = run("snapshot", "list", "emr").output
    assert "s1" in table and "s2" in table and "(newest)" in table
    assert run("snapshot", "revert", "emr", "s2").output.strip() == "vm emr: reverted to snapshot s2; running"
    assert run("snapshot", "delete", "emr", "s1").output.strip() == "vm emr: snapshot s1 deleted"
    r = run("snapshot", "revert", "emr", "s1")
    assert "no snapshot 's1'" in error_of(r) and r.exit_code == 3
    r = run("snapshot", "create", "emr", "a/b")
    assert "snapshot 'a/b' may contain only" in error_of(r) and r.exit_code == 2
    assert [s["name"] for s in json.loads(run("snapshot", "list", "emr", "--json").output)] == ["s2"]


def test_a_snapshot_taken_as_the_control_plane_died_is_settled_at_its_next_start(env: Env) -> None:
    """The intent is recorded before the agent is asked: a restart adopts layers that exist, drops the rest."""
    from kasou.control.snapshots import _intent
    from kasou.hypervisor.snapshots import SnapshotDiskNow, SnapshotTake
    from kasou.model.snapshots import SnapshotCreate

    env.create("emr", start=True)
    vms = env.services.vms
    portal = env.api.portal  # type: ignore[attr-defined]
    base = disk_path(env, "emr")

    async def died_after_the_agent(name: str, taken: bool) -> None:
        rec = await vms.records.get("emr")
        spec = SnapshotCreate(name=name)
        await vms.records.update(
            "emr", lambda r: r.model_copy(update={"snapshots": [*r.snapshots, _intent(rec, spec)]})
        )
        if taken:  # the agent took it; the control plane died before recording it
            req = SnapshotTake(snapshot=name, disks=[SnapshotDiskNow(id=d.id, path=d.path or "") for d in rec.disks])
            await vms.agents.get(rec.host).take_snapshot("emr", req)

    portal.call(vms.suspend)  # the control plane stops (its background work with it)
    portal.call(died_after_the_agent, "taken", True)
    [s] = env.api.get("/v1/vms/emr/snapshots").json()
    assert s["state"] == "taking"
    assert env.api.post("/v1/vms/emr/snapshots/taken/revert").status_code == 409  # not usable yet
    portal.call(vms.startup)  # the next start of the control plane
    [s] = env.api.get("/v1/vms/emr/snapshots").json()
    assert s["state"] == "ready" and s["name"] == "taken"
    overlay = disk_path(env, "emr")
    assert overlay.endswith("disk0.taken.qcow2") and backing(overlay) == base  # the VM's record follows its layers

    portal.call(vms.suspend)
    portal.call(died_after_the_agent, "never", False)
    portal.call(vms.startup)
    assert [x["name"] for x in env.api.get("/v1/vms/emr/snapshots").json()] == ["taken"]  # the intent is dropped
    assert disk_path(env, "emr") == overlay
    portal.call(vms.suspend)
