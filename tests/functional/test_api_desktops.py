"""Desktop pools and the desktop portal through the API, with the fake driver."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from tests.functional.conftest import Env

PW = "correct horse battery"
CSRF = {"x-kasou-csrf": "1"}


def _template(env: Env, name: str = "base") -> None:
    env.create(name)
    assert env.api.post(f"/v1/vms/{name}/template").json()["state"] == "template"


def _pool(env: Env, name: str = "ward3", **kw: Any) -> dict:
    body = {"name": name, "template": "base", "size": 2, "prestart": 1, **kw}
    r = env.api.post("/v1/desktop-pools", json=body)
    assert r.status_code == 202, r.text
    job = env.wait(r.json()["job"])
    assert job["state"] == "succeeded", job
    return _wait_for(env, "pre-started desktop", lambda: _ready(env, name, kw.get("prestart", 1)))


def _ready(env: Env, name: str, k: int) -> dict | None:
    p = env.api.get(f"/v1/desktop-pools/{name}").json()
    return p if p["free_ready"] >= k and p["state"] == "ready" else None


def _wait_for(env: Env, what: str, check: Any, timeout: float = 15) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def _user(env: Env, name: str, pools: list[str], role: str = "clinician") -> None:
    r = env.api.post("/v1/users", json={"name": name, "role": role, "password": PW, "pools": pools})
    assert r.status_code == 201, r.text


def _session(env: Env, name: str) -> TestClient:
    c = env.client(base_url="http://testserver")
    r = c.post("/v1/auth/login", json={"name": name, "password": PW})
    assert r.status_code == 200, r.text
    return c


def _desktop(c: TestClient, pool: str) -> dict:
    r = c.post("/v1/portal/desktop", json={"pool": pool}, headers=CSRF)
    assert r.status_code == 200, r.text
    return dict(r.json())


def _disk(env: Env, vm: str) -> Path:
    return Path(env.api.get(f"/v1/vms/{vm}").json()["disks"][0]["path"])


def test_pool_create_list_delete(env: Env) -> None:
    _template(env)
    p = _pool(env, "ward3", size=3, prestart=2, allow_clipboard=True)
    assert [d["vm"] for d in p["desktops"]] == ["ward3-01", "ward3-02", "ward3-03"]
    assert p["size"] == 3 and p["in_use"] == 0 and p["free_ready"] == 2
    vms = {v["name"]: v for v in env.api.get("/v1/vms").json()}
    assert vms["ward3-01"]["template"] == "base" and vms["ward3-01"]["disks"][0]["linked"]
    assert sorted(n for n, v in vms.items() if v["state"] == "running") == ["ward3-01", "ward3-02"]
    assert [x["name"] for x in env.api.get("/v1/desktop-pools").json()] == ["ward3"]
    job = env.api.delete("/v1/desktop-pools/ward3").json()["job"]
    assert env.wait(job)["state"] == "succeeded"
    assert env.api.get("/v1/desktop-pools").json() == []
    assert [v["name"] for v in env.api.get("/v1/vms").json()] == ["base"]
    assert not [f for f in env.disk_files() if "ward3" in str(f)]


def test_portal_same_desktop_exhaustion_and_release_on_logout(env: Env) -> None:
    _template(env)
    _pool(env, "ward3", size=2, prestart=1)
    _user(env, "nurse1", ["ward3"])
    _user(env, "nurse2", ["ward3"])
    _user(env, "nurse3", ["ward3"])
    _user(env, "outsider", [])
    n1 = _session(env, "nurse1")
    pools = n1.get("/v1/portal/pools").json()
    assert [(p["name"], p["free"], p["my_desktop"]) for p in pools] == [("ward3", 2, None)]
    d1 = _desktop(n1, "ward3")
    assert d1["vm"] == "ward3-01" and d1["guest_ready"] and d1["console"] == "/ui/console.html?vm=ward3-01"
    assert _desktop(n1, "ward3")["vm"] == "ward3-01"  # the same one again while the session lasts
    assert [d["vm"] for d in n1.get("/v1/portal/desktop").json()] == ["ward3-01"]
    n2 = _session(env, "nurse2")
    d2 = _desktop(n2, "ward3")  # none pre-started left right now: one started for it
    assert d2["vm"] == "ward3-02" and d2["vm_state"] == "running"
    r = _session(env, "nurse3").post("/v1/portal/desktop", json={"pool": "ward3"}, headers=CSRF)
    assert r.status_code == 409 and "exhausted" in r.json()["message"]
    # Entitlement: a pool the user is not entitled to, and clinicians kept out of the operators' API.
    out = _session(env, "outsider")
    r = out.post("/v1/portal/desktop", json={"pool": "ward3"}, headers=CSRF)
    assert r.status_code == 403 and "not entitled" in r.json()["message"]
    assert out.get("/v1/portal/pools").json() == []
    assert n1.get("/v1/desktop-pools").status_code == 403
    # The console's checks.
    svc = env.services.vms.desktops
    import asyncio

    assert asyncio.run(svc.user_may_open("nurse1", "ward3-01")) is True
    assert asyncio.run(svc.user_may_open("nurse1", "ward3-02")) is False
    assert asyncio.run(svc.user_may_open("nurse2", "base")) is False
    assert asyncio.run(svc.console_policy("ward3-01")).model_dump() == {
        "clipboard": False, "file_transfer": False, "usb": False, "record": False}  # fmt: skip
    assert asyncio.run(svc.console_policy("base")).model_dump() == {
        "clipboard": False, "file_transfer": False, "usb": False, "record": False}  # fmt: skip
    # Sign-out returns the desktop; it is reset (a fresh overlay) and pre-started again.
    before = _disk(env, "ward3-01")
    before.write_bytes(before.read_bytes() + b"session data")  # what the session left on its disk
    assert n1.post("/v1/auth/logout", headers=CSRF).status_code == 200
    p = _wait_for(env, "the desktop back in the pool", lambda: _free(env, "ward3-01"))
    assert p["user"] is None
    after = _disk(env, "ward3-01")
    assert after.exists() and b"session data" not in after.read_bytes()
    assert env.api.get("/v1/vms/ward3-01").json()["disks"][0]["backing"].endswith("disk0.qcow2")
    assert asyncio.run(svc.user_may_open("nurse1", "ward3-01")) is False
    # Another user now gets that desktop.
    assert _desktop(_session(env, "nurse3"), "ward3")["vm"] == "ward3-01"
    # An explicit release works too.
    r = n2.post("/v1/portal/desktop/release", json={"pool": "ward3"}, headers=CSRF)
    assert r.json() == {"released": ["ward3-02"]}
    _wait_for(env, "ward3-02 reset", lambda: _free(env, "ward3-02"))


def _free(env: Env, vm: str) -> dict | None:
    p = env.api.get(f"/v1/desktop-pools/{vm.rsplit('-', 1)[0]}").json()
    d = next(d for d in p["desktops"] if d["vm"] == vm)
    return d if d["state"] == "free" else None


def test_idle_session_returns_the_desktop(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    _template(env)
    _pool(env, "ward3", size=1, prestart=1, idle_minutes=5)
    _user(env, "nurse1", ["ward3"])
    n1 = _session(env, "nurse1")
    assert _desktop(n1, "ward3")["vm"] == "ward3-01"
    monkeypatch.setenv("KASOU_SESSION_IDLE", "0")  # the session is now past its idle time
    time.sleep(0.01)
    _wait_for(env, "the idle session's desktop back", lambda: _free(env, "ward3-01"))
    assert n1.get("/v1/portal/desktop").status_code == 401


def test_pool_idle_minutes(env: Env) -> None:
    import asyncio

    _template(env)
    _pool(env, "ward3", size=1, prestart=0, idle_minutes=1)
    _user(env, "nurse1", ["ward3"])
    n1 = _session(env, "nurse1")
    _desktop(n1, "ward3")
    svc = env.services.vms.desktops
    store = env.services.store
    key = next(e.key for e in asyncio.run(store.range("sessions/")))
    e = asyncio.run(store.get(key))
    asyncio.run(store.put(key, {**e.value, "last_used": time.time() - 61}))  # quiet for more than a minute
    assert asyncio.run(svc.user_may_open("nurse1", "ward3-01")) is True
    _wait_for(env, "the pool's idle time", lambda: _free(env, "ward3-01"))


def test_persistent_pool_keeps_the_desktop(env: Env) -> None:
    _template(env)
    _pool(env, "doc", size=1, prestart=0, persistent=True)
    _user(env, "dr", ["doc"])
    _user(env, "dr2", ["doc"])
    c = _session(env, "dr")
    d = _desktop(c, "doc")
    disk = _disk(env, d["vm"])
    assert c.post("/v1/auth/logout", headers=CSRF).status_code == 200
    _wait_for(env, "returned", lambda: _free(env, "doc-01"))
    assert _disk(env, "doc-01") == disk  # not reset
    r = _session(env, "dr2").post("/v1/portal/desktop", json={"pool": "doc"}, headers=CSRF)
    assert r.status_code == 409  # it stays dr's
    assert _desktop(_session(env, "dr"), "doc")["vm"] == "doc-01"


def test_delete_refused_in_use_and_resize(env: Env) -> None:
    _template(env)
    _pool(env, "ward3", size=2, prestart=0)
    _user(env, "nurse1", ["ward3"])
    _desktop(_session(env, "nurse1"), "ward3")
    r = env.api.delete("/v1/desktop-pools/ward3")
    assert r.status_code == 409 and "in use" in r.json()["message"] and "nurse1" in r.json()["message"]
    r = env.api.patch("/v1/desktop-pools/ward3", json={"size": 3, "prestart": 1})
    assert r.status_code == 202, r.text
    assert env.wait(r.json()["job"])["state"] == "succeeded"
    p = env.api.get("/v1/desktop-pools/ward3").json()
    assert [d["vm"] for d in p["desktops"]] == ["ward3-01", "ward3-02", "ward3-03"] and p["prestart"] == 1
    r = env.api.patch("/v1/desktop-pools/ward3", json={"size": 0})
    assert r.status_code == 422
    r = env.api.patch("/v1/desktop-pools/ward3", json={"size": 1, "prestart": 2})
    assert r.status_code == 422 and "prestart" in r.json()["message"]
    r = env.api.patch("/v1/desktop-pools/ward3", json={"size": 1, "prestart": 0})  # the free ones go
    assert r.status_code == 202, r.text
    assert env.wait(r.json()["job"])["state"] == "succeeded"
    assert [d["vm"] for d in env.api.get("/v1/desktop-pools/ward3").json()["desktops"]] == ["ward3-01"]
    r = env.api.delete("/v1/desktop-pools/ward3", params={"force": True})
    assert r.status_code == 202 and env.wait(r.json()["job"])["state"] == "succeeded"
    assert [v["name"] for v in env.api.get("/v1/vms").json()] == ["base"]


@pytest.mark.parametrize(
    ("body", "status", "words"),
    [
        ({"template": "nosuch"}, 422, "unknown template"),
        ({"size": 0}, 422, "size must be between"),
        ({"size": 2, "prestart": 3}, 422, "prestart must be between"),
        ({"name": "../x"}, 422, "must not contain"),
        ({"name": "a b"}, 422, "may contain only"),
        ({"name": "x" * 61}, 422, "at most 60"),
        ({"idle_minutes": 0}, 422, "idle_minutes"),
        ({"size": "2"}, 422, "size"),
        ({"colour": "red"}, 422, "colour"),
        ({"template": "plain"}, 422, "not a template"),
    ],
)
def test_bad_input_changes_nothing(env: Env, body: dict, status: int, words: str) -> None:
    _template(env)
    env.create("plain")
    before = sorted(v["name"] for v in env.api.get("/v1/vms").json())
    r = env.api.post("/v1/desktop-pools", json={"name": "ward3", "template": "base", "size": 2, **body})
    assert r.status_code == status, r.text
    assert words in r.json()["message"], r.json()
    assert env.api.get("/v1/desktop-pools").json() == []
    assert sorted(v["name"] for v in env.api.get("/v1/vms").json()) == before


def test_names_taken_refused(env: Env) -> None:
    _template(env)
    env.create("ward3-02")
    r = env.api.post("/v1/desktop-pools", json={"name": "ward3", "template": "base", "size": 2})
    assert r.status_code == 409 and "ward3-02" in r.json()["message"]
    assert env.api.get("/v1/desktop-pools").json() == []


def test_pool_record_setting_at_create_and_set(env: Env) -> None:
    """Whether a pool's console sessions are recorded: off by default, set at create, changed later."""
    _template(env)
    p = _pool(env, "ward4", size=1, prestart=0)
    assert p["record"] is False
    r = env.api.patch("/v1/desktop-pools/ward4", json={"record": True})
    assert r.status_code == 202, r.text
    assert env.api.get("/v1/desktop-pools/ward4").json()["record"] is True
    assert env.services.vms.desktops is not None
    assert env.api.patch("/v1/desktop-pools/ward4", json={"record": "yes"}).status_code == 422
    _pool(env, "ward5", size=1, prestart=0, record=True)
    assert env.api.get("/v1/desktop-pools/ward5").json()["record"] is True
