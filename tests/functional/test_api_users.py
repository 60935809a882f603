"""Users, sign-in sessions and roles through the API (the root token is an administrator)."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from tests.functional.conftest import Env

PW = "correct horse battery"


def _user(env: Env, name: str, role: str, **kw: object) -> None:
    r = env.api.post("/v1/users", json={"name": name, "role": role, "password": PW, **kw})
    assert r.status_code == 201, r.text


def _session(env: Env, name: str, password: str = PW) -> TestClient:
    c = TestClient(env.api.app, base_url="http://testserver")  # no token: a browser with a cookie
    r = c.post("/v1/auth/login", json={"name": name, "password": password})
    assert r.status_code == 200, r.text
    return c


def test_sign_in_and_roles(env: Env) -> None:
    _user(env, "ope", "operator")
    _user(env, "nurse", "clinician", pools=["ward3"])
    op = _session(env, "ope")
    assert op.cookies.get("kasou_session")
    me = op.get("/v1/auth/me").json()
    assert me["name"] == "ope" and me["role"] == "operator" and "operate" in me["permissions"]
    assert op.get("/v1/vms").status_code == 200
    # A change through a cookie needs the CSRF header the web UI sends.
    r = op.post("/v1/vms", json={"name": "a", "image": "tiny"})
    assert r.status_code == 403 and "x-kasou-csrf" in r.json()["message"]
    r = op.post("/v1/vms", json={"name": "a", "image": "tiny"}, headers={"x-kasou-csrf": "1"})
    assert r.status_code == 202, r.text
    assert op.get("/v1/users").status_code == 403  # no user management
    nurse = _session(env, "nurse")
    assert nurse.get("/v1/auth/me").json()["pools"] == ["ward3"]
    for path in ("/v1/vms", "/v1/hosts", "/v1/events", "/v1/pools"):
        assert nurse.get(path).status_code == 403, path
    r = nurse.post("/v1/auth/logout", headers={"x-kasou-csrf": "1"})
    assert r.status_code == 200
    assert nurse.get("/v1/auth/me").status_code == 401


def test_wrong_passwords_lock_the_account(env: Env) -> None:
    _user(env, "ope", "operator")
    c = TestClient(env.api.app)
    for _ in range(5):
        r = c.post("/v1/auth/login", json={"name": "ope", "password": "wrong password!"})
        assert r.status_code == 401 and r.json()["message"] == "wrong user name or password"
    r = c.post("/v1/auth/login", json={"name": "ope", "password": PW})
    assert r.status_code == 401 and "locked" in r.json()["message"]
    assert env.api.get("/v1/users").json()[0]["locked"] is True
    env.api.post("/v1/users/ope/password", json={"password": PW})  # an administrator unlocks it
    assert c.post("/v1/auth/login", json={"name": "ope", "password": PW}).status_code == 200
    r = c.post("/v1/auth/login", json={"name": "nobody", "password": PW})
    assert r.status_code == 401 and r.json()["message"] == "wrong user name or password"


def test_idle_sessions_end(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    _user(env, "ope", "operator")
    c = _session(env, "ope")
    monkeypatch.setenv("KASOU_SESSION_IDLE", "0")
    r = c.get("/v1/auth/me")
    assert r.status_code == 401 and "without use" in r.json()["message"]


@pytest.mark.parametrize(
    ("body", "words"),
    [
        ({"name": "x", "role": "operator", "password": "short"}, "10 to 1024"),
        ({"name": "../x", "role": "operator", "password": PW}, "must not contain"),
        ({"name": "x", "role": "god", "password": PW}, "role"),
        ({"name": "x", "role": "operator", "password": " " + PW}, "spaces"),
        ({"name": "x", "role": "clinician", "password": PW, "pools": ["a/b"]}, "may contain only"),
    ],
)
def test_bad_users_are_refused(env: Env, body: dict, words: str) -> None:
    r = env.api.post("/v1/users", json=body)
    assert r.status_code == 422 and words in r.json()["message"], r.text
    assert env.api.get("/v1/users").json() == []


def test_users_are_managed_by_administrators(env: Env) -> None:
    _user(env, "boss", "admin")
    _user(env, "ope", "operator")
    boss = _session(env, "boss")
    assert [u["name"] for u in boss.get("/v1/users").json()] == ["boss", "ope"]
    assert "password" not in str(boss.get("/v1/users").json()).lower().replace("password_", "")
    r = boss.delete("/v1/users/ope", headers={"x-kasou-csrf": "1"})
    assert r.status_code == 204
    assert env.api.post("/v1/users", json={"name": "boss", "role": "admin", "password": PW}).status_code == 409


def test_auditors_read_and_change_nothing(env: Env) -> None:
    _user(env, "aud", "auditor")
    aud = _session(env, "aud")
    me = aud.get("/v1/auth/me").json()
    assert me["role"] == "auditor" and me["permissions"] == ["audit", "read", "vm.read"]
    for path in ("/v1/vms", "/v1/reports/uptime", "/v1/audit/records", "/v1/audit/verify"):
        assert aud.get(path).status_code == 200, path
    csrf = {"x-kasou-csrf": "1"}
    assert aud.post("/v1/vms", json={"name": "a", "image": "tiny"}, headers=csrf).status_code == 403
    assert aud.post("/v1/users", json={"name": "b", "role": "admin", "password": PW}, headers=csrf).status_code == 403
    assert aud.get("/v1/users").status_code == 403
