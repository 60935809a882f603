"""Devices and sizes that change, through the API on the fake driver (real qcow2 files): vm set --vcpus/--memory,
disk add/remove/resize (hot-plug on a running VM), NIC add/remove, vm create with several disks, and the
refusals, each one line with nothing changed."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

from kasou.model.state import VMState
from tests.functional.conftest import Cluster, Env


def _vm(env: Env | Cluster, name: str) -> dict[str, Any]:
    return dict(env.api.get(f"/v1/vms/{name}").json())


def _job(env: Env | Cluster, r: Any) -> dict[str, Any]:
    assert r.status_code == 202, r.text
    return dict(env.wait(r.json()["job"]))


def _ok(env: Env | Cluster, r: Any) -> dict[str, Any]:
    job = _job(env, r)
    assert job["state"] == "succeeded", job
    return dict(job["result"])


def _virtual_size(path: str) -> int:
    out = subprocess.run(["qemu-img", "info", "--output=json", "-U", path], capture_output=True, check=True, timeout=30)
    return int(json.loads(out.stdout)["virtual-size"])


def _refused(r: Any, status: int, words: str) -> None:
    assert r.status_code == status, r.text
    msg = r.json()["message"]
    assert words in msg and "\n" not in msg, msg


# -- vCPUs and memory -------------------------------------------------------------------------------


def test_vm_set_sizes_now_on_a_stopped_vm_and_at_the_next_start_on_a_running_one(env: Env) -> None:
    env.create("emr")
    r = env.api.patch("/v1/vms/emr", json={"vcpus": 2, "memory_mib": 256})
    assert r.status_code == 200, r.text
    v = r.json()
    assert (v["vcpus"], v["memory_mib"], v["next_start"]) == (2, 256, {})
    assert env.act("emr", "start")["state"] == "succeeded"
    assert (env.driver.specs["emr"].vcpus, env.driver.specs["emr"].memory_mib) == (2, 256)
    assert env.driver.specs["emr"].pci_ports == 8  # its hot-plug ports, from this start on
    # While it runs: recorded for the next start; the running VM, its view and its host's load stay as they are.
    v = env.api.patch("/v1/vms/emr", json={"memory_mib": 384}).json()
    assert (v["vcpus"], v["memory_mib"], v["next_start"]) == (2, 256, {"memory_mib": 384})
    assert env.act("emr", "stop")["state"] == "succeeded"
    assert env.act("emr", "start")["state"] == "succeeded"
    v = _vm(env, "emr")
    assert (v["memory_mib"], v["next_start"]) == (384, {})
    assert env.driver.specs["emr"].memory_mib == 384
    # Set back to what it runs with: nothing waits any more.
    env.api.patch("/v1/vms/emr", json={"memory_mib": 512})
    assert env.api.patch("/v1/vms/emr", json={"memory_mib": 384}).json()["next_start"] == {}


def test_vm_set_sizes_are_refused_past_the_limits_with_nothing_changed(env: Env) -> None:
    env.create("emr", firmware="uefi", memory_mib=256)
    before = _vm(env, "emr")
    for body, status, words in [
        ({"vcpus": 0}, 422, "vcpus must be between 1 and 255"),
        ({"memory_mib": 16}, 422, "memory_mib must be between 32"),
        ({"vcpus": 200}, 422, "more than any host has"),
        ({"memory_mib": 1024 * 1024}, 422, "more than any host can give"),
        ({"memory_mib": 128}, 422, "UEFI needs at least"),
        ({"vcpus": "2"}, 422, "vcpus"),
    ]:
        _refused(env.api.patch("/v1/vms/emr", json=body), status, words)
    assert _vm(env, "emr") == before


def test_vm_set_sizes_are_in_the_audit_trail(env: Env) -> None:
    env.create("emr")
    assert env.api.patch("/v1/vms/emr", json={"vcpus": 2}).status_code == 200
    rows = env.api.get("/v1/audit/records").json()
    last = rows[-1]
    assert last["target"] == "vms/emr" and last["details"]["body"] == {"vcpus": 2}, last


# -- disks ------------------------------------------------------------------------------------------


def test_create_with_several_disks_keeps_the_single_value_form(env: Env) -> None:
    one = env.create("a", disk="64M")
    assert [d["id"] for d in one["disks"]] == ["disk0"] and one["disks"][0]["size_bytes"] == 64 << 20
    v = env.create("b", disk=["64M", "32M", "16M"])
    assert [(d["id"], d["size_bytes"], d["port"]) for d in v["disks"]] == [
        ("disk0", 64 << 20, None), ("disk1", 32 << 20, 1), ("disk2", 16 << 20, 2),
    ]  # fmt: skip
    assert all(Path(d["path"]).exists() for d in v["disks"])
    assert env.act("b", "start")["state"] == "succeeded"
    assert [d.id for d in env.driver.specs["b"].disks] == ["disk0", "disk1", "disk2"]
    _refused(env.api.post("/v1/vms", json={"name": "c", "image": "tiny", "disk": ["64M", "1"]}), 422, "disk")
    _refused(env.api.post("/v1/vms", json={"name": "c", "image": "tiny", "disk": []}), 422, "between 1 and 16")


def test_disk_add_resize_remove_on_a_running_vm(env: Env) -> None:
    env.create("emr", start=True)
    r = _ok(env, env.api.post("/v1/vms/emr/disks", json={"size": "32M"}))
    assert r["disk"] == "disk1" and r["hotplug"] is True
    d1 = _vm(env, "emr")["disks"][1]
    assert d1["size_bytes"] == 32 << 20 and d1["port"] == 1 and Path(d1["path"]).exists()
    assert [(d.id, d.port) for d in env.driver.specs["emr"].disks] == [("disk0", None), ("disk1", 1)]
    # Online growth; a smaller or equal size is refused.
    r = _ok(env, env.api.post("/v1/vms/emr/disks/disk1/resize", json={"size": "48M"}))
    assert r["online"] is True and _virtual_size(d1["path"]) == 48 << 20
    assert _vm(env, "emr")["disks"][1]["size_bytes"] == 48 << 20
    _refused(env.api.post("/v1/vms/emr/disks/disk1/resize", json={"size": "16M"}), 422, "a disk only grows")
    _refused(env.api.post("/v1/vms/emr/disks/disk1/resize", json={"size": "48M"}), 422, "already")
    # The boot disk is never removed; the new disk is, and its file goes.
    _refused(env.api.delete("/v1/vms/emr/disks/disk0"), 409, "boot disk")
    r = _ok(env, env.api.delete("/v1/vms/emr/disks/disk1"))
    assert r["hotplug"] is True and not Path(d1["path"]).exists()
    assert [d["id"] for d in _vm(env, "emr")["disks"]] == ["disk0"]
    assert [d.id for d in env.driver.specs["emr"].disks] == ["disk0"]


def test_disk_changes_on_a_stopped_vm_touch_only_the_record_and_the_file(env: Env) -> None:
    v = env.create("emr")
    r = _ok(env, env.api.post("/v1/vms/emr/disks", json={"size": "16M"}))
    assert r["hotplug"] is False
    r = _ok(env, env.api.post("/v1/vms/emr/disks/disk0/resize", json={"size": "8M"}))
    assert r["online"] is False and _virtual_size(v["disks"][0]["path"]) == 8 << 20
    assert env.act("emr", "start")["state"] == "succeeded"  # its start sees both disks, disk1 on its port
    assert [(d.id, d.port) for d in env.driver.specs["emr"].disks] == [("disk0", None), ("disk1", 1)]


def test_a_failed_hot_plug_leaves_no_file_and_no_record(env: Env) -> None:
    env.create("emr", start=True)
    files = env.disk_files()
    before = _vm(env, "emr")["disks"]
    env.driver.fail_next_plug = "Bus 'hp1' does not support hotplugging"
    job = _job(env, env.api.post("/v1/vms/emr/disks", json={"size": "16M"}))
    assert job["state"] == "failed" and "hotplugging" in job["error"]["message"]
    assert env.disk_files() == files and _vm(env, "emr")["disks"] == before
    assert _vm(env, "emr")["job"] is None


def test_an_unplug_the_guest_does_not_answer_keeps_the_disk(env: Env) -> None:
    env.create("emr", start=True)
    _ok(env, env.api.post("/v1/vms/emr/disks", json={"size": "16M"}))
    env.driver.unplug_hangs = True
    job = _job(env, env.api.delete("/v1/vms/emr/disks/disk1"))
    assert job["state"] == "failed" and "did not release device disk1-dev" in job["error"]["message"]
    d1 = _vm(env, "emr")["disks"][1]
    assert d1["id"] == "disk1" and Path(d1["path"]).exists()


def test_disk_changes_are_refused_where_they_cannot_apply(env: Env) -> None:
    env.create("emr", start=True)
    env.act("emr", "pause")
    _refused(env.api.post("/v1/vms/emr/disks", json={"size": "16M"}), 409, "while it is paused")
    env.act("emr", "resume")
    # With snapshots: a revert would bring back the old disks.
    r = env.api.post("/v1/vms/emr/snapshots", json={"name": "s1"})
    assert env.wait(r.json()["job"])["state"] == "succeeded"
    _refused(env.api.post("/v1/vms/emr/disks", json={"size": "16M"}), 409, "delete them first")
    _refused(env.api.post("/v1/vms/emr/disks/disk0/resize", json={"size": "1G"}), 409, "snapshots")
    assert env.wait(env.api.delete("/v1/vms/emr/snapshots/s1").json()["job"])["state"] == "succeeded"
    # Bad input.
    _refused(env.api.post("/v1/vms/emr/disks", json={"size": "lots"}), 422, "is not a size")
    _refused(env.api.post("/v1/vms/emr/disks", json={"size": "16M", "pool": "nope"}), 422, "unknown pool")
    _refused(env.api.post("/v1/vms/emr/disks/disk7/resize", json={"size": "1G"}), 404, "has no disk disk7")
    _refused(env.api.delete("/v1/vms/emr/disks/vda"), 422, "not a disk")
    # A disk the VM was created with on the root bus cannot be unplugged while it runs.
    env.create("pacs", disk=["64M", "16M"])

    def root_bus(r: Any) -> Any:
        return r.model_copy(update={"disks": [d.model_copy(update={"port": None}) for d in r.disks]})

    env.api.portal.call(env.services.vms.records.update, "pacs", root_bus)
    assert env.act("pacs", "start")["state"] == "succeeded"
    _refused(env.api.delete("/v1/vms/pacs/disks/disk1"), 409, "root bus")


def test_a_mirrored_vm_grows_both_copies_offline_and_refuses_online(env: Env) -> None:
    for p in ("a", "b"):
        assert env.api.post("/v1/pools", json={"name": p, "path": str(env.tmp / f"pool-{p}")}).status_code == 201
    v = env.create("emr", mirror=["a", "b"], disk="64M")
    _ok(env, env.api.post("/v1/vms/emr/disks/disk0/resize", json={"size": "80M"}))
    d = _vm(env, "emr")["disks"][0]
    assert _virtual_size(d["path"]) == 80 << 20 and _virtual_size(d["mirror"]["path"]) == 80 << 20
    _refused(env.api.post("/v1/vms/emr/disks", json={"size": "16M"}), 409, "no second copy")
    assert env.act("emr", "start")["state"] == "succeeded"
    _refused(env.api.post("/v1/vms/emr/disks/disk0/resize", json={"size": "96M"}), 409, "stop the VM")
    assert v["disks"][0]["path"] == d["path"]
    _refused(env.api.post("/v1/vms", json={"name": "x", "image": "tiny", "mirror": ["a", "b"], "disk": ["64M", "1G"]}),
             422, "one disk")  # fmt: skip


def test_a_full_pool_refuses_a_growth_with_its_numbers(env: Env) -> None:
    assert env.api.post("/v1/pools", json={"name": "small", "path": str(env.tmp / "p"), "capacity": "1G"}).status_code
    env.create("emr", pool="small", disk="700M")
    _refused(env.api.post("/v1/vms/emr/disks/disk0/resize", json={"size": "2G"}), 409, "limit of 1 GiB")
    _refused(env.api.post("/v1/vms/emr/disks", json={"size": "400M"}), 409, "limit of 1 GiB")
    assert [d["size_bytes"] for d in _vm(env, "emr")["disks"]] == [700 << 20]


# -- NICs -------------------------------------------------------------------------------------------


def test_nic_add_and_remove_hot_plug_with_a_unique_mac(env: Env) -> None:
    v = env.create("emr", start=True)
    r = _ok(env, env.api.post("/v1/vms/emr/nics", json={"network": "user"}))
    assert r["nic"] == "net1" and r["hotplug"] is True and r["mac"] != v["nics"][0]["mac"]
    nics = _vm(env, "emr")["nics"]
    assert [(n["id"], n["port"]) for n in nics] == [("net0", None), ("net1", 1)]
    assert [n.id for n in env.driver.specs["emr"].nics] == ["net0", "net1"]
    _refused(env.api.post("/v1/vms/emr/nics", json={"network": "nope"}), 422, "unknown network")
    _refused(env.api.delete("/v1/vms/emr/nics/net0"), 409, "root bus")
    _refused(env.api.delete("/v1/vms/emr/nics/net5"), 404, "has no NIC net5")
    r = _ok(env, env.api.delete("/v1/vms/emr/nics/net1"))
    assert [n["id"] for n in _vm(env, "emr")["nics"]] == ["net0"]
    assert [n.id for n in env.driver.specs["emr"].nics] == ["net0"]


def test_a_migrating_vm_refuses_device_changes(cluster: Cluster) -> None:
    cluster.create("emr", start=True)
    rec = cluster.services.vms.records

    def migrating(r: Any) -> Any:
        return r.model_copy(update={"state": VMState.MIGRATING, "job": "jmig"})

    cluster.api.portal.call(rec.update, "emr", migrating)
    for r in (
        cluster.api.post("/v1/vms/emr/disks", json={"size": "16M"}),
        cluster.api.post("/v1/vms/emr/nics", json={"network": "user"}),
        cluster.api.post("/v1/vms/emr/disks/disk0/resize", json={"size": "1G"}),
        cluster.api.patch("/v1/vms/emr", json={"vcpus": 2}),
    ):
        _refused(r, 409, "migrating")


def test_a_hot_added_disk_migrates_and_is_in_snapshots_and_backups(cluster: Cluster) -> None:
    vm = cluster.create("emr", start=True, storage="shared")
    _ok(cluster, cluster.api.post("/v1/vms/emr/disks", json={"size": "16M"}))
    source = vm["host"]
    target = next(h for h in cluster.drivers if h != source)
    job = cluster.wait(cluster.api.post("/v1/vms/emr/migrate", json={"to": target}).json()["job"])
    assert job["state"] == "succeeded", job["error"]
    launched = cluster.drivers[target].specs["emr"]
    assert [(d.id, d.port) for d in launched.disks] == [("disk0", None), ("disk1", 1)]
    assert launched.pci_ports == 8
    r = cluster.api.post("/v1/vms/emr/snapshots", json={"name": "s1"})
    assert cluster.wait(r.json()["job"])["state"] == "succeeded"
    (snap,) = cluster.api.portal.call(cluster.services.vms.records.get, "emr").snapshots
    assert [d.id for d in snap.disks] == ["disk0", "disk1"]
    r = cluster.api.post("/v1/vms/emr/backups", json={})
    job = cluster.wait(r.json()["job"])
    assert job["state"] == "succeeded", job
    gens = cluster.api.get("/v1/vms/emr/backups").json()
    assert "disk1" in json.dumps(gens)


def test_sizes_wait_while_a_snapshot_holds_the_vms_memory(env: Env) -> None:
    env.create("emr", start=True)
    r = env.api.post("/v1/vms/emr/snapshots", json={"name": "m1", "memory": True})
    assert env.wait(r.json()["job"])["state"] == "succeeded"
    _refused(env.api.patch("/v1/vms/emr", json={"memory_mib": 256}), 409, "snapshots with its memory (m1)")
    assert _vm(env, "emr")["memory_mib"] == 128
