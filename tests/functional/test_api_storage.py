"""Storage pools and mirrored disks through the API, with a fake hypervisor and real qcow2 files."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tests.doubles.driver import FakeDriver
from tests.functional.conftest import Env


def _pool(env: Env, name: str, **kw: Any) -> dict[str, Any]:
    path = kw.pop("path", None) or str(env.tmp / f"pool-{name}")
    r = env.api.post("/v1/pools", json={"name": name, "path": path, **kw})
    assert r.status_code == 201, r.text
    return dict(r.json())


def _vm(env: Env, name: str) -> dict[str, Any]:
    return dict(env.api.get(f"/v1/vms/{name}").json())


def _wait(env: Env, what: str, check: Any, timeout: float = 10) -> Any:
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = check()
        if v:
            return v
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def test_pools_are_listed_with_capacity_allocation_and_overcommit(env: Env) -> None:
    p = _pool(env, "fast", capacity="2G", overcommit=1.5)
    assert p["path"].endswith("pool-fast") and Path(p["path"]).is_dir()
    env.create("emr", pool="fast", disk="1G")
    pools = {p["name"]: p for p in env.api.get("/v1/pools").json()}
    assert set(pools) == {"default", "fast"}
    (h,) = pools["fast"]["hosts"]
    assert h["state"] == "ok" and h["capacity_bytes"] == 2 << 30 and h["limit_bytes"] == 3 << 30
    assert h["provisioned_bytes"] == 1 << 30 and h["overcommit_ratio"] == 0.5
    assert 0 < h["allocated_bytes"] < 64 << 20  # thin: the file holds what the image holds
    assert pools["fast"]["disks"] == 1
    v = _vm(env, "emr")
    assert v["disks"][0]["pool"] == "fast" and v["disks"][0]["path"].startswith(p["path"])


def test_a_disk_past_the_pool_limit_is_refused_with_the_numbers(env: Env) -> None:
    _pool(env, "small", capacity="1G")
    env.create("a", pool="small", disk="700M")
    before = env.api.get("/v1/vms").json()
    r = env.api.post("/v1/vms", json={"name": "b", "image": "tiny", "pool": "small", "disk": "400M"})
    assert r.status_code == 409, r.text
    msg = r.json()["message"]
    assert "700 MiB provisioned + 400 MiB requested" in msg and "limit of 1 GiB" in msg, msg
    assert env.api.get("/v1/vms").json() == before  # nothing changed
    assert not list((env.tmp / "pool-small").glob("b/*"))


def test_bad_pool_input_changes_nothing(env: Env) -> None:
    _pool(env, "a")
    cases = [
        ({"name": "x", "image": "tiny", "pool": "nope"}, 422, "unknown pool 'nope'"),
        ({"name": "x", "image": "tiny", "mirror": ["a", "a"]}, 422, "two pools, not twice"),
        ({"name": "x", "image": "tiny", "mirror": ["a"]}, 422, "two pools"),
        ({"name": "x", "image": "tiny", "mirror": ["a", "../etc"]}, 422, "pool"),
        ({"name": "x", "image": "tiny", "mirror": ["a", "b"], "storage": "replicated"}, 422, "cannot also be"),
    ]
    for body, status, words in cases:
        r = env.api.post("/v1/vms", json=body)
        assert r.status_code == status, (body, r.text)
        assert words in r.json()["message"], (body, r.json())
    for body, words in [
        ({"name": "b", "path": "relative/dir"}, "absolute"),
        ({"name": "b", "path": "/etc"}, "system directory"),
        ({"name": "b", "path": "/etc/cron.d"}, "system directory /etc"),
        ({"name": "b", "path": "/etc/systemd/system"}, "system directory /etc"),
        ({"name": "b", "path": "/root"}, "system directory /root"),
        ({"name": "b", "path": "/var/lib/kasou"}, "kasou's own directory /var/lib/kasou"),
        ({"name": "b", "path": "/opt/pools"}, "outside the storage roots (/srv, "),
        ({"name": "a", "path": str(env.tmp / "other")}, "already exists"),
        ({"name": "b", "path": str(env.tmp / "pool-a" / "inner")}, "overlaps pool 'a'"),
        ({"name": "default", "path": str(env.tmp / "d")}, "built-in"),
        ({"name": "b/c", "path": str(env.tmp / "d")}, "may contain only"),
        ({"name": "b", "path": str(env.tmp / "d"), "overcommit": 0.5}, "overcommit"),
    ]:
        r = env.api.post("/v1/pools", json=body)
        assert r.status_code in (422, 409), (body, r.text)
        assert words in r.json()["message"], (body, r.json())
    assert [p["name"] for p in env.api.get("/v1/pools").json()] == ["default", "a"]
    assert env.api.get("/v1/vms").json() == []


def test_a_pool_in_use_cannot_be_deleted(env: Env) -> None:
    _pool(env, "a")
    env.create("emr", pool="a")
    r = env.api.delete("/v1/pools/a")
    assert r.status_code == 409 and "emr" in r.json()["message"]
    env.wait(env.api.delete("/v1/vms/emr").json()["job"])
    assert env.api.delete("/v1/pools/a").status_code == 204
    assert env.api.delete("/v1/pools/default").status_code == 422


def test_a_mirrored_disk_has_two_equal_copies_and_starts_without_copying(env: Env) -> None:
    _pool(env, "a")
    _pool(env, "b")
    env.create("emr", mirror=["a", "b"], start=True)
    d = _vm(env, "emr")["disks"][0]
    assert d["pool"] == "a" and d["mirror"]["pool"] == "b" and d["mirror"]["state"] == "in_sync"
    assert Path(d["path"]).exists() and Path(d["mirror"]["path"]).exists()
    assert Path(d["path"]).read_bytes() == Path(d["mirror"]["path"]).read_bytes()
    driver: FakeDriver = env.driver
    assert driver.mirror_syncs == [("emr", "disk0", "none")]  # made equal: nothing to copy at the first start
    env.act("emr", "stop")
    env.act("emr", "start")
    assert driver.mirror_syncs[-1] == ("emr", "disk0", "none")  # stopped clean, in sync
    driver.crash("emr")
    _wait(env, "crashed", lambda: _vm(env, "emr")["state"] == "crashed")
    env.act("emr", "start")
    assert driver.mirror_syncs[-1] == ("emr", "disk0", "full")  # after a crash the copies may differ


def test_a_lost_copy_is_degraded_with_an_event_and_rebuilt_online(env: Env) -> None:
    _pool(env, "a")
    _pool(env, "b")
    _pool(env, "c")
    env.create("emr", mirror=["a", "b"], start=True)
    first = _vm(env, "emr")["disks"][0]
    env.driver.fail_mirror_copy("emr", "disk0", "first", "the copy failed (I/O error)")
    d = _wait(env, "degraded", lambda: (x := _vm(env, "emr")["disks"][0])["mirror"]["state"] == "degraded" and x)
    assert d["pool"] == "b" and d["path"] == first["mirror"]["path"]  # runs on the second copy now
    assert d["mirror"]["pool"] == "a" and d["mirror"]["path"] is None and d["mirror"]["failed"] == first["path"]
    events = env.api.get("/v1/events", params={"subject": "vm/emr"}).json()
    assert [e["kind"] for e in events] == ["disk_degraded"] and events[0]["severity"] == "error"
    assert "kasou disk rebuild emr disk0" in events[0]["message"]

    # Rebuild onto its own pool or an unknown one: refused, nothing changes.
    for pool, status in (("b", 422), ("nope", 422)):
        r = env.api.post("/v1/vms/emr/disks/disk0/rebuild", json={"pool": pool})
        assert r.status_code == status, r.text
    r = env.api.post("/v1/vms/emr/disks/disk0/rebuild", json={"pool": "c"})
    assert r.status_code == 202, r.text
    job = env.wait(r.json()["job"])
    assert job["state"] == "succeeded", job
    d = _vm(env, "emr")["disks"][0]
    assert d["mirror"]["state"] == "in_sync" and d["mirror"]["pool"] == "c"
    assert not Path(first["path"]).exists(), "the failed copy's file is removed at the rebuild"
    kinds = [e["kind"] for e in env.api.get("/v1/events", params={"subject": "vm/emr"}).json()]
    assert kinds == ["disk_degraded", "disk_healthy"]
    assert env.api.get("/v1/events/active").json() == []


def test_rebuild_of_a_stopped_vm_copies_offline(env: Env) -> None:
    _pool(env, "a")
    _pool(env, "b")
    _pool(env, "c")
    env.create("emr", mirror=["a", "b"])
    job = env.wait(env.api.post("/v1/vms/emr/disks/disk0/rebuild", json={"pool": "c"}).json()["job"])
    assert job["state"] == "succeeded" and job["result"]["online"] is False, job
    d = _vm(env, "emr")["disks"][0]
    assert d["mirror"]["pool"] == "c" and Path(d["mirror"]["path"]).exists()
    assert not list((env.tmp / "pool-b").rglob("*.qcow2")), "the replaced second copy is removed"


def test_rebuild_onto_a_full_pool_is_refused(env: Env) -> None:
    _pool(env, "a")
    _pool(env, "b")
    _pool(env, "tiny-pool", capacity="10M")
    env.create("emr", mirror=["a", "b"])
    r = env.api.post("/v1/vms/emr/disks/disk0/rebuild", json={"pool": "tiny-pool"})
    assert r.status_code == 409 and "pool 'tiny-pool' on host host1" in r.json()["message"], r.text
    assert _vm(env, "emr")["job"] is None and _vm(env, "emr")["disks"][0]["mirror"]["pool"] == "b"


def test_deleting_a_mirrored_vm_removes_both_copies(env: Env) -> None:
    _pool(env, "a")
    _pool(env, "b")
    env.create("emr", mirror=["a", "b"])
    assert len(list(env.tmp.glob("pool-*/emr/*.qcow2"))) == 2
    env.wait(env.api.delete("/v1/vms/emr").json()["job"])
    assert not list(env.tmp.glob("pool-*/emr/*.qcow2"))


def test_a_low_pool_raises_one_warning(env: Env) -> None:
    _pool(env, "big", capacity="60T", overcommit=1.0, warn_free_pct=90)  # far more than the disk has free: low
    env.api.get("/v1/pools")  # warms the agents
    svc = env.services
    portal = env.api.portal  # type: ignore[attr-defined]
    portal.call(svc.vms.pools.tick)
    portal.call(svc.vms.pools.tick)
    events = [e for e in env.api.get("/v1/events").json() if e["subject"] == "pool/big"]
    assert [e["kind"] for e in events] == ["pool_low_space"], events
    assert "low on space" in events[0]["message"]


def test_a_mirrored_vm_cannot_become_a_template(env: Env) -> None:
    _pool(env, "a")
    _pool(env, "b")
    env.create("emr", mirror=["a", "b"])
    r = env.api.post("/v1/vms/emr/template")
    assert r.status_code == 409 and "mirrored" in r.json()["message"], r.text
    assert _vm(env, "emr")["state"] == "stopped"
