"""Tags, list filters and bulk actions (kasou.model.selection, kasou.control.bulk, kasou.api.bulk)."""

from __future__ import annotations

import time
from typing import Any

from fastapi.testclient import TestClient
from typer.testing import CliRunner

from kasou.api.client import Client
from kasou.cli import common
from kasou.cli.main import app as cli_app
from tests.functional.conftest import TOKEN, Env
from tests.functional.test_role_matrix import CSRF, PW, open_window


def bulk(env: Env, action: str, body: dict[str, Any], client: TestClient | None = None) -> dict[str, Any]:
    c = client or env.api
    r = c.post(f"/v1/vms/actions/{action}", json=body, headers=CSRF)
    assert r.status_code == 202, r.text
    job = env.wait(r.json()["job"])
    assert job["state"] == "succeeded", job
    return dict(job["result"])


def names(env: Env, **params: Any) -> list[str]:
    r = env.api.get("/v1/vms", params=params)
    assert r.status_code == 200, r.text
    return sorted(v["name"] for v in r.json())


def test_tags_at_create_and_changed(env: Env) -> None:
    v = env.create("a", tags=["ward-a", "emr", "emr"])
    assert v["tags"] == ["emr", "ward-a"]
    r = env.api.patch("/v1/vms/a", json={"add_tags": ["lab"], "remove_tags": ["emr"]})
    assert r.status_code == 200 and r.json()["tags"] == ["lab", "ward-a"], r.text
    r = env.api.patch("/v1/vms/a", json={"tags": ["x"]})
    assert r.json()["tags"] == ["x"]
    # bad input: one line, nothing changed
    r = env.api.patch("/v1/vms/a", json={"add_tags": ["ok", "bad tag"]})
    assert r.status_code == 422 and "tag 'bad tag' may contain only" in r.json()["message"], r.text
    assert env.api.get("/v1/vms/a").json()["tags"] == ["x"]
    r = env.api.post("/v1/vms", json={"name": "b", "image": "tiny", "tags": ["../etc"]})
    assert r.status_code == 422 and "tag" in r.json()["message"]
    assert env.api.get("/v1/vms/b").status_code == 404
    r = env.api.patch("/v1/vms/a", json={"tags": [f"t{i}" for i in range(33)]})
    assert r.status_code == 422 and "at most 32 tags" in r.json()["message"]


def test_list_filters(env: Env) -> None:
    env.create("a", tags=["emr", "ward-a"], department="lab")
    env.create("b", tags=["emr"], department="pacs")
    env.create("c", tags=["ward-a"], department="lab", start=True)
    assert names(env, tag="emr") == ["a", "b"]
    assert names(env, tag=["emr", "ward-a"]) == ["a"]
    assert names(env, department="lab") == ["a", "c"]
    assert names(env, state="running") == ["c"]
    assert names(env, state="stopped", department="lab") == ["a"]
    assert names(env, host="host1") == ["a", "b", "c"]
    assert names(env, host="host2") == []
    r = env.api.get("/v1/vms", params={"state": "runing"})
    assert r.status_code == 422 and "'running'" in r.json()["message"] and "'stopped'" in r.json()["message"]
    r = env.api.get("/v1/vms", params={"tag": "bad tag"})
    assert r.status_code == 422


def test_bulk_start_and_stop_with_per_vm_results(env: Env) -> None:
    for n in ("a", "b", "c"):
        env.create(n, tags=["ward-a"])
    env.create("d", tags=["other"])
    env.act("a", "start")
    res = bulk(env, "start", {"tags": ["ward-a"]})
    by = {r["vm"]: r for r in res["vms"]}
    assert set(by) == {"a", "b", "c"}
    assert by["a"]["outcome"] == "skipped" and by["a"]["reason"] == "already running"
    assert by["b"]["outcome"] == by["c"]["outcome"] == "succeeded"
    assert (res["succeeded"], res["failed"], res["skipped"]) == (2, 0, 1)
    assert env.api.get("/v1/vms/d").json()["state"] == "stopped"
    res = bulk(env, "stop", {"all": True})
    assert {r["vm"]: r["outcome"] for r in res["vms"]} == {"a": "succeeded", "b": "succeeded", "c": "succeeded",
                                                           "d": "skipped"}  # fmt: skip
    assert names(env, state="running") == []


def test_bulk_partial_failure_says_why(env: Env) -> None:
    env.create("ok", tags=["t"])
    env.create("big", tags=["t"])
    env.driver.fail_next_start = "qemu-system-x86_64: cannot allocate memory"  # the first start (one at a time)
    res = bulk(env, "start", {"tags": ["t"], "per_host": 1})
    by = {r["vm"]: r for r in res["vms"]}
    assert by["ok"]["outcome"] == "succeeded"
    assert by["big"]["outcome"] == "failed" and "cannot allocate memory" in by["big"]["reason"], by["big"]
    assert "\n" not in by["big"]["reason"]
    assert res["failed"] == 1 and res["succeeded"] == 1


def test_bulk_without_a_selector_is_refused(env: Env) -> None:
    env.create("a")
    for body in ({}, None, {"per_host": 2}):
        r = env.api.post("/v1/vms/actions/start", json=body)
        assert r.status_code == 422 and "all" in r.json()["message"], r.text
    r = env.api.post("/v1/vms/actions/start", json={"all": True, "tags": ["x"]})
    assert r.status_code == 422
    r = env.api.post("/v1/vms/actions/start", json={"names": ["nope"]})
    assert r.status_code == 404 and r.json()["message"] == "no VM named 'nope'"
    r = env.api.post("/v1/vms/actions/reboot", json={"all": True})
    assert r.status_code == 422
    assert env.api.get("/v1/vms/a").json()["state"] == "stopped"
    assert [j for j in env.api.get("/v1/jobs").json() if j["kind"].startswith("bulk")] == []


def test_start_order_groups_and_delay(env: Env) -> None:
    env.create("db", tags=["emr"], startup={"onboot": True, "order": 1, "delay_s": 1})
    env.create("app1", tags=["emr"], startup={"onboot": True, "order": 2})
    env.create("app2", tags=["emr"], startup={"onboot": True, "order": 2})
    env.create("misc", tags=["emr"])
    began = time.monotonic()
    res = bulk(env, "start", {"tags": ["emr"]})
    assert res["groups"] == [["db"], ["app1", "app2"], ["misc"]]
    assert res["succeeded"] == 4 and time.monotonic() - began >= 1.0
    started = {v["name"]: v["started_at"] for v in env.api.get("/v1/vms").json()}
    assert started["app1"] - started["db"] >= 1.0 and started["app2"] - started["db"] >= 1.0
    res = bulk(env, "shutdown", {"tags": ["emr"]})
    assert res["groups"] == [["misc"], ["app1", "app2"], ["db"]]  # the reverse order


def test_a_vendor_bulk_action_stays_inside_their_window(env: Env) -> None:
    env.create("lab1", department="lab", tags=["t"])
    env.create("lab2", department="lab", tags=["t"])
    env.create("pacs1", department="pacs", tags=["t"])
    r = env.api.post("/v1/users", json={"name": "v", "role": "vendor", "password": PW, "departments": ["lab"]})
    assert r.status_code == 201
    c = env.client(base_url="http://testserver")
    c.portal = env.api.portal
    assert c.post("/v1/auth/login", json={"name": "v", "password": PW}).status_code == 200
    r = c.post("/v1/vms/actions/start", json={"all": True}, headers=CSRF)
    assert r.status_code == 403 and "maintenance window" in r.json()["message"]  # no window: nothing at all
    wid = open_window(env, c, "v", ["lab1"])
    r = c.post("/v1/vms/actions/start", json={"tags": ["t"]}, headers=CSRF)
    assert r.status_code == 202, r.text
    assert r.json()["vms"] == ["lab1"]  # lab2 is outside the window, pacs1 outside their departments
    job = r.json()["job"]
    done = c.get(f"/v1/jobs/{job['id']}")  # the vendor follows their job
    assert done.status_code == 200, done.text
    final = env.wait(job)
    assert [x["vm"] for x in final["result"]["vms"]] == ["lab1"]
    states = {v["name"]: v["state"] for v in env.api.get("/v1/vms").json()}
    assert states == {"lab1": "running", "lab2": "stopped", "pacs1": "stopped"}
    rec = [a for a in env.api.get("/v1/audit/records").json() if a.get("action", "").endswith("start")]
    assert any((a.get("details") or {}).get("window") == wid for a in rec), rec
    r = c.post("/v1/vms/actions/stop", json={"names": ["pacs1"]}, headers=CSRF)
    assert r.status_code == 404 and r.json()["message"] == "no VM named 'pacs1'"
    # a manager holds no operate
    env.api.post("/v1/users", json={"name": "m", "role": "manager", "password": PW, "departments": ["lab"]})
    m = env.client(base_url="http://testserver")
    assert m.post("/v1/auth/login", json={"name": "m", "password": PW}).status_code == 200
    assert m.post("/v1/vms/actions/stop", json={"all": True}, headers=CSRF).status_code == 403


def test_the_cli(env: Env) -> None:
    runner = CliRunner()
    common.client_factory = lambda: Client("http://testserver", TOKEN, http=env.api)
    try:

        def run(*args: str, code: int = 0) -> str:
            r = runner.invoke(cli_app, list(args))
            assert r.exit_code == code, (args, r.output)
            return r.output

        run("vm", "create", "a", "--image", "tiny", "--tag", "emr", "--tag", "ward-a")
        run("vm", "create", "b", "--image", "tiny", "--tag", "emr", "--department", "lab")
        assert "emr, ward-a" in run("vm", "show", "a")
        assert "vm a: tags emr, lab, ward-a" in run("vm", "tag", "add", "a", "lab")
        assert "vm a: tags emr, lab" in run("vm", "tag", "remove", "a", "ward-a")
        run("vm", "tag", "add", "a", "bad tag", code=2)  # bad input (HTTP 422): a usage error
        run("vm", "set", "b", "--tag", "emr", "--tag", "x")
        assert env.api.get("/v1/vms/b").json()["tags"] == ["emr", "x"]
        listed = run("vm", "list", "--tag", "emr", "--department", "lab")
        assert " b " in listed and " a " not in listed and "emr,x" in listed
        run("vm", "start", code=2)  # no VM named, no selector: refused before anything is asked
        out = run("vm", "start", "--tag", "emr")
        assert "2 succeeded, 0 failed, 0 skipped" in out
        assert "running" in run("vm", "list", "--state", "running")
        out = run("vm", "stop", "--all")
        assert "2 succeeded" in out
        run("vm", "list", "--state", "runnin", code=2)
        env.driver.fail_next_start = "no room"
        out = run("vm", "start", "a", "b", "--parallel", "1", code=1)  # one failed: exit 1
        assert "1 succeeded, 1 failed" in out and "no room" in out
        assert "already running" in run("vm", "start", "a", "b", "--json")
    finally:
        common.client_factory = None
