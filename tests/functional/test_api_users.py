"""Users, sign-in sessions and roles through the API (the root token is an administrator)."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Iterator
from types import SimpleNamespace

import httpx
import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from kasou.api.client import Client
from kasou.cli import common
from kasou.cli.main import app as cli_app
from tests.functional.conftest import TOKEN, Env

PW = "correct horse battery"


def _user(env: Env, name: str, role: str, **kw: object) -> None:
    r = env.api.post("/v1/users", json={"name": name, "role": role, "password": PW, **kw})
    assert r.status_code == 201, r.text


def _session(env: Env, name: str, password: str = PW) -> TestClient:
    c = env.client(base_url="http://testserver")  # no token: a browser with a cookie
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
    c = env.client()
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


# -- sign-in under attack: concurrent guesses, many addresses, floods ------------------------------

WRONG = "wrong user name or password"


def _logins(env: Env, attempts: list[tuple[dict, str]]) -> list[httpx.Response]:
    """Sign-in attempts sent all at once, each ``(body, source address)`` from its own client."""

    async def one(body: dict, source: str) -> httpx.Response:
        transport = httpx.ASGITransport(app=env.api.app, client=(source, 40000))
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as c:
            return await c.post("/v1/auth/login", json=body)

    async def all_at_once() -> list[httpx.Response]:
        return list(await asyncio.gather(*(one(b, s) for b, s in attempts)))

    return env.api.portal.call(all_at_once)


def _locked_until(env: Env, name: str) -> float | None:
    return env.api.portal.call(env.services.users.get, name).locked_until


def test_concurrent_wrong_passwords_lock_the_account_and_it_stays_locked(env: Env) -> None:
    _user(env, "ope", "operator")
    # 50 wrong passwords at once, from 50 addresses (no per-address limit applies).
    rs = _logins(env, [({"name": "ope", "password": f"wrong password {i}"}, f"10.1.0.{i}") for i in range(50)])
    assert all(r.status_code == 401 for r in rs), [r.text for r in rs]
    msgs = [r.json()["message"] for r in rs]
    # Only as many passwords as the lock-out allows were tried; every other attempt was told "locked".
    assert msgs.count(WRONG) <= 5, msgs
    assert sum("locked" in m for m in msgs) >= 45, msgs
    assert env.api.get("/v1/users").json()[0]["locked"] is True
    until = _locked_until(env, "ope")
    assert until is not None and until > time.time() + 250
    # More wrong attempts while locked never shorten (nor clear) the lock.
    rs = _logins(env, [({"name": "ope", "password": "still wrong!"}, f"10.2.0.{i}") for i in range(3)])
    assert all("locked" in r.json()["message"] for r in rs), [r.text for r in rs]
    assert env.api.get("/v1/users").json()[0]["locked"] is True and _locked_until(env, "ope") == until
    # The right password is refused too, from anywhere, while the lock lasts.
    (r,) = _logins(env, [({"name": "ope", "password": PW}, "10.3.0.1")])
    assert r.status_code == 401 and "locked" in r.json()["message"], r.text
    (lock,) = env.api.get("/v1/audit/records", params={"action": "lockout"}).json()
    assert lock["target"] == "users/ope"


def test_the_lock_message_is_the_same_for_unknown_users(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    """No enumeration: a name that does not exist locks after as many failures, with the same words, and costs
    one password hash check per attempt as a real user's does."""
    from kasou.control import users as users_mod

    _user(env, "ope", "operator")
    checks: list[str] = []
    real_verify = getattr(users_mod, "_verify", None)

    def counted(digest: str, password: str) -> bool:
        checks.append(password)
        assert real_verify is not None
        return bool(real_verify(digest, password))

    monkeypatch.setattr(users_mod, "_verify", counted, raising=False)

    def answers(name: str, source: str) -> tuple[list[tuple[int, str]], int]:
        checks.clear()
        out = []
        for _ in range(7):
            (r,) = _logins(env, [({"name": name, "password": "wrong password!"}, source)])
            out.append((r.status_code, re.sub(r"\d+ s$", "N s", r.json()["message"].replace(repr(name), "NAME"))))
        return out, len(checks)

    real, real_checks = answers("ope", "10.4.0.1")
    ghost, ghost_checks = answers("nobody", "10.4.0.2")
    assert real == ghost, (real, ghost)
    assert real_checks == ghost_checks == 5
    assert real[-1] == (401, "user NAME is locked after 5 failed sign-ins; try again in N s")


def test_failed_sign_ins_from_one_address_are_rate_limited(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    from kasou.api import limits

    clock = [1000.0]  # the limiter's clock stands still unless the test moves it
    monkeypatch.setattr(limits, "time", SimpleNamespace(monotonic=lambda: clock[0]), raising=False)
    monkeypatch.setenv("KASOU_SIGNIN_RATE", "10")
    _user(env, "ope", "operator")
    _user(env, "nurse", "clinician")
    # Ten failures in a row from one address (each to another name, so no account locks)...
    for i in range(10):
        (r,) = _logins(env, [({"name": f"someone{i}", "password": "wrong password!"}, "10.5.0.1")])
        assert r.status_code == 401 and r.json()["message"] == WRONG, r.text
    # ... then that address is answered 429 with Retry-After, even with a right password; no account is charged.
    (r,) = _logins(env, [({"name": "ope", "password": PW}, "10.5.0.1")])
    assert r.status_code == 429 and r.json()["code"] == "rate_limited", r.text
    assert r.headers["retry-after"] == "6" and "10.5.0.1" in r.json()["message"]
    assert env.api.portal.call(env.services.users.get, "ope").failures == 0
    clock[0] += 6  # one more attempt a 6 s
    (r,) = _logins(env, [({"name": "ope", "password": PW}, "10.5.0.1")])
    assert r.status_code == 200, r.text
    # Another address is not limited; right passwords do not use up the allowance.
    for _ in range(12):
        (r,) = _logins(env, [({"name": "nurse", "password": PW}, "10.5.0.2")])
        assert r.status_code == 200, r.text
    # Concurrent attempts from one address cannot all slip in before the first one fails.
    rs = _logins(env, [({"name": f"x{i}", "password": "wrong password!"}, "10.5.0.3") for i in range(30)])
    assert sorted(r.status_code for r in rs) == [401] * 10 + [429] * 20
    # A right password asked for its TOTP code (the web UI's first step) is not held against the address.
    from kasou.control import totp

    secret = env.api.post("/v1/users/nurse/totp").json()["secret"]
    r = env.api.post("/v1/users/nurse/totp/confirm", json={"totp": totp.code_at(secret, time.time() - 30)})
    assert r.status_code == 200, r.text
    for _ in range(12):
        (r,) = _logins(env, [({"name": "nurse", "password": PW}, "10.5.0.4")])
        assert r.status_code == 401 and r.json()["details"]["totp"] == "required", r.text
        env.api.post("/v1/users/nurse/password", json={"password": PW})  # (the account's own count: reset)
    # IPv6: one /64 is one source.
    rs = _logins(env, [({"name": f"y{i}", "password": "wrong password!"}, f"2001:db8::{i:x}") for i in range(12)])
    assert sum(r.status_code == 429 for r in rs) == 2


def test_an_anonymous_flood_adds_a_bounded_number_of_audit_records(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    from kasou.api import audit as api_audit

    monkeypatch.setattr(api_audit, "ANON_WINDOW_S", 600.0, raising=False)
    burst = getattr(api_audit, "ANON_BURST", 5)
    anon = env.client(headers={"Authorization": "Bearer not-the-token"})
    before = len(env.api.get("/v1/audit/records").json())
    for _ in range(100):
        assert anon.post("/v1/networks", json={"name": "x"}).status_code == 401
    mid = env.api.get("/v1/audit/records").json()
    assert len(mid) - before <= burst, len(mid) - before
    # The window ends: the rest is one aggregate record (written with the next request, or by a timer).
    monkeypatch.setattr(api_audit, "ANON_WINDOW_S", 0.01)
    time.sleep(0.05)
    env.api.get("/v1/version")
    (agg,) = env.api.get("/v1/audit/records", params={"action": "anonymous_failures"}).json()
    n = 100 - burst
    assert agg["details"]["count"] == n and agg["source"] == "testclient", agg
    assert agg["result"]["message"].startswith(f"{n} more anonymous failures from testclient in the last ")
    assert agg["details"]["actions"] == {"POST /v1/networks": n}
    # A signed-in user's requests are recorded one by one, as before.
    for i in range(20):
        env.api.post("/v1/networks", json={"name": f"net{i}"})
    assert len(env.api.get("/v1/audit/records", params={"action": "POST /v1/networks"}).json()) >= 20 + 5


def test_a_chunked_request_body_is_audited(env: Env) -> None:
    def chunks() -> Iterator[bytes]:
        yield b'{"name": '
        yield b'"chunky"}'

    r = env.api.post("/v1/networks", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 201, r.text
    rec = env.api.get("/v1/audit/records", params={"action": "POST /v1/networks"}).json()[-1]
    assert rec["details"]["body"] == {"name": "chunky"} and rec["target"] == "networks/chunky", rec


# -- an administrator ends a user's sessions -------------------------------------------------------


def test_a_password_reset_ends_the_users_sessions(env: Env) -> None:
    _user(env, "ope", "operator")
    a, b = _session(env, "ope"), _session(env, "ope")
    r = env.api.post("/v1/users/ope/password", json={"password": "a new horse battery"})
    assert r.status_code == 200 and r.json() == {"ok": True, "sessions_ended": 2}, r.text
    for c in (a, b):
        r = c.get("/v1/auth/me")
        assert r.status_code == 401, r.text
    assert _session(env, "ope", "a new horse battery").get("/v1/auth/me").status_code == 200


def test_administrators_sign_a_user_out(env: Env) -> None:
    _user(env, "boss", "admin")
    _user(env, "ope", "operator")
    a, b = _session(env, "ope"), _session(env, "ope")
    boss = _session(env, "boss")
    assert a.post("/v1/users/ope/signout", headers={"x-kasou-csrf": "1"}).status_code == 403  # not their own right
    assert a.get("/v1/auth/me").status_code == 200
    r = boss.post("/v1/users/ope/signout", headers={"x-kasou-csrf": "1"})
    assert r.status_code == 200 and r.json() == {"ok": True, "sessions_ended": 2}, r.text
    assert a.get("/v1/auth/me").status_code == 401 and b.get("/v1/auth/me").status_code == 401
    assert boss.get("/v1/auth/me").status_code == 200
    assert env.api.post("/v1/users/nobody/signout").status_code == 404
    rec = env.api.get("/v1/audit/records", params={"target": "users/ope"}).json()
    (so,) = [x for x in rec if x["action"] == "POST /v1/users/ope/signout" and x["result"]["ok"]]
    assert so["actor"]["name"] == "boss"
    # The CLI.
    c = _session(env, "ope")
    runner = CliRunner()
    common.client_factory = lambda: Client("http://testserver", TOKEN, http=env.api)
    try:
        r = runner.invoke(cli_app, ["user", "signout", "ope"])
        assert r.exit_code == 0 and "user ope: 1 session ended" in r.output, r.output
    finally:
        common.client_factory = None
    assert c.get("/v1/auth/me").status_code == 401
