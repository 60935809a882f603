"""Identity beyond passwords: per-user API tokens, the TOTP second factor, the break-glass account."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import stat
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from kasou.api.client import Client
from kasou.cli import common
from kasou.cli.main import app as cli_app
from kasou.control import breakglass, totp
from kasou.control.tokens import TOKENS_PREFIX
from kasou.errors import Unauthorized
from tests.functional.conftest import TOKEN, Env

PW = "correct horse battery"
CSRF = {"x-kasou-csrf": "1"}


def _user(env: Env, name: str, role: str, **kw: object) -> None:
    r = env.api.post("/v1/users", json={"name": name, "role": role, "password": PW, **kw})
    assert r.status_code == 201, r.text


def _records(env: Env, **params: Any) -> list[dict[str, Any]]:
    r = env.api.get("/v1/audit/records", params=params)
    assert r.status_code == 200, r.text
    return list(r.json())


def _bearer(env: Env, token: str) -> TestClient:
    return env.client(headers={"Authorization": f"Bearer {token}"})


def _login(env: Env, name: str, password: str = PW, code: str | None = None) -> tuple[TestClient, Any]:
    c = env.client()  # a browser: no token
    body: dict[str, Any] = {"name": name, "password": password}
    if code is not None:
        body["totp"] = code
    return c, c.post("/v1/auth/login", json=body)


# -- API tokens ----------------------------------------------------------------------------------


def test_user_tokens_act_as_their_user(env: Env) -> None:
    _user(env, "ope", "operator")
    _user(env, "lab", "vendor", departments=["lab"])
    r = env.api.post("/v1/users/ope/tokens", json={"label": "backup script", "expires_days": 30})
    assert r.status_code == 201, r.text
    made = r.json()
    tok, tid = made["token"], made["id"]
    assert tok.startswith("ksu_") and made["expires_at"] > time.time() + 29 * 86400
    ope = _bearer(env, tok)
    me = ope.get("/v1/auth/me").json()
    assert (me["name"], me["role"], me["via"]) == ("ope", "operator", "token")
    # No CSRF header for a token (it is not a cookie); the user's role holds.
    r = ope.post("/v1/vms", json={"name": "a", "image": "tiny"})
    assert r.status_code == 202, r.text
    env.wait(r.json()["job"])
    assert ope.get("/v1/users").status_code == 403
    rec = [x for x in _records(env) if x["action"] == "POST /v1/vms"][-1]
    assert rec["actor"] == {"name": "ope", "role": "operator", "via": "token"}
    # A vendor's token carries the vendor's departments.
    lab_tok = env.api.post("/v1/users/lab/tokens", json={}).json()["token"]
    me = _bearer(env, lab_tok).get("/v1/auth/me").json()
    assert me["role"] == "vendor" and me["departments"] == ["lab"]
    assert '"name":"a"' not in _bearer(env, lab_tok).get("/v1/vms").text  # "a" is of no department
    # Listed without the token; the root token still works.
    listed = env.api.get("/v1/users/ope/tokens").json()
    assert [t["id"] for t in listed] == [tid] and "token" not in listed[0] and listed[0]["last_used"]
    assert listed[0]["label"] == "backup script" and listed[0]["expired"] is False
    # Never in clear in the store or the audit log.
    store_text = json.dumps([e.value for e in env.api.portal.call(env.services.store.range, "")])
    assert tok not in store_text and lab_tok not in store_text
    # Revoked: it stops at once; creation and revocation are in the audit log.
    assert env.api.delete(f"/v1/users/ope/tokens/{tid}").status_code == 204
    r = ope.get("/v1/auth/me")
    assert r.status_code == 401 and tok not in r.text
    assert env.api.delete(f"/v1/users/ope/tokens/{tid}").status_code == 404
    actions = [(x["action"], x["target"], x["result"]["ok"]) for x in _records(env, target="users/ope")]
    assert ("POST /v1/users/ope/tokens", "users/ope", True) in actions
    assert (f"DELETE /v1/users/ope/tokens/{tid}", "users/ope", True) in actions
    # A token that is not kasou's: one line, no echo.
    r = _bearer(env, "ksu_made-up").get("/v1/vms")
    assert r.status_code == 401 and "made-up" not in r.text


def test_user_tokens_expire_and_end_with_their_user(env: Env) -> None:
    _user(env, "ope", "operator")
    tok = env.api.post("/v1/users/ope/tokens", json={"expires_days": 1}).json()["token"]
    c = _bearer(env, tok)
    assert c.get("/v1/vms").status_code == 200
    # Expired: a day has passed (the record's expiry moved back).
    store = env.services.store
    (e,) = env.api.portal.call(store.range, TOKENS_PREFIX)
    env.api.portal.call(store.put, e.key, {**e.value, "expires_at": time.time() - 1})
    r = c.get("/v1/vms")
    assert r.status_code == 401 and "expired" in r.json()["message"]
    assert env.api.get("/v1/users/ope/tokens").json()[0]["expired"] is True
    # A locked user's tokens stop while the lock lasts.
    tok = env.api.post("/v1/users/ope/tokens", json={}).json()["token"]
    c = _bearer(env, tok)
    for _ in range(5):
        _login(env, "ope", "wrong password!")
    r = c.get("/v1/vms")
    assert r.status_code == 401 and "locked" in r.json()["message"]
    env.api.post("/v1/users/ope/password", json={"password": PW})  # unlocked
    assert c.get("/v1/vms").status_code == 200
    # A deleted user's tokens stop, also when a user of the same name comes back.
    assert env.api.delete("/v1/users/ope").status_code == 204
    assert c.get("/v1/vms").status_code == 401
    _user(env, "ope", "admin")
    assert c.get("/v1/users").status_code == 401
    assert env.api.get("/v1/users/ope/tokens").json() == []


@pytest.mark.parametrize(
    ("body", "words"),
    [({"expires_days": 0}, "greater than or equal"), ({"label": "x" * 101}, "at most"), ({"token": "x"}, "Extra")],
)
def test_bad_token_requests_are_refused(env: Env, body: dict[str, Any], words: str) -> None:
    _user(env, "ope", "operator")
    r = env.api.post("/v1/users/ope/tokens", json=body)
    assert r.status_code == 422 and words in r.text, r.text
    assert env.api.post("/v1/users/nobody/tokens", json={}).status_code == 404
    assert env.api.get("/v1/users/ope/tokens").json() == []


# -- TOTP ----------------------------------------------------------------------------------------


def _fresh_step() -> float:
    """Now, at least 10 s before the current TOTP step ends (so the codes below stay in the window)."""
    left = totp.STEP_S - time.time() % totp.STEP_S
    if left < 10:
        time.sleep(left + 0.1)
    return time.time()


def _enroll(env: Env, name: str, now: float) -> str:
    e = env.api.post(f"/v1/users/{name}/totp").json()
    assert e["uri"].startswith(f"otpauth://totp/kasou:{name}?") and f"secret={e['secret']}" in e["uri"]
    r = env.api.post(f"/v1/users/{name}/totp/confirm", json={"totp": totp.code_at(e["secret"], now - 30)})
    assert r.status_code == 200 and r.json()["totp"] is True, r.text
    return str(e["secret"])


def test_totp_enroll_confirm_and_sign_in(env: Env) -> None:
    _user(env, "boss", "admin")
    now = _fresh_step()
    e = env.api.post("/v1/users/boss/totp").json()
    secret = e["secret"]
    # Enrolled but not confirmed: not needed yet; a wrong code does not confirm it.
    assert _login(env, "boss")[1].status_code == 200
    wrong = "000000" if totp.code_at(secret, now) != "000000" else "111111"
    r = env.api.post("/v1/users/boss/totp/confirm", json={"totp": wrong})
    assert r.status_code == 422 and "not right" in r.json()["message"]
    assert env.api.post("/v1/users/boss/totp").json()["secret"] != secret  # enrolling again replaces it
    secret = _enroll(env, "boss", now)
    assert env.api.post("/v1/users/boss/totp").status_code == 409  # on: disable first
    # Missing code: refused, and the client is told a code is needed.
    c, r = _login(env, "boss")
    assert r.status_code == 401 and r.json()["details"]["totp"] == "required", r.text
    # Wrong code.
    r = _login(env, "boss", code=wrong)[1]
    assert r.status_code == 401 and r.json()["details"]["totp"] == "required"
    # The right code signs in, once: replayed, it is refused (and so is the older one used to confirm).
    code = totp.code_at(secret, now)
    c, r = _login(env, "boss", code=code)
    assert r.status_code == 200 and c.get("/v1/auth/me").json()["name"] == "boss"
    r = _login(env, "boss", code=code)[1]
    assert r.status_code == 401 and "used already" in r.json()["message"]
    assert _login(env, "boss", code=totp.code_at(secret, now - 30))[1].status_code == 401
    # Two sign-ins at once with one code: one passes.
    users, later = env.services.users, totp.code_at(secret, now + 30)

    async def both() -> list[Any]:
        return list(
            await asyncio.gather(*(users.login("boss", PW, "", later) for _ in range(2)), return_exceptions=True)
        )

    results = env.api.portal.call(both)
    assert sum(isinstance(x, tuple) for x in results) == 1, results
    assert _login(env, "boss", code=later)[1].status_code == 401
    # The secret is never shown again, nor kept in the audit log with the codes.
    assert secret not in env.api.get("/v1/users").text and env.api.get("/v1/users").json()[0]["totp"] is True
    text = json.dumps(_records(env))
    assert secret not in text and code not in text
    # Nor is it in the store in the clear: sealed with the site's secrets key, a 0600 file beside the store.
    stored = env.api.portal.call(users.get, "boss").totp_secret
    assert stored.startswith("sealed:v1:") and secret not in stored
    assert users.sealer.open(stored, "the TOTP secret of user 'boss'") == secret
    assert (users.sealer.path.stat().st_mode & 0o777) == 0o600 and users.sealer.path.parent == env.tmp
    # A lost device: an administrator turns it off; the password alone works again.
    assert env.api.delete("/v1/users/boss/totp").json()["totp"] is False
    assert _login(env, "boss")[1].status_code == 200


def test_users_change_their_own_password_and_set_up_their_own_totp(env: Env) -> None:
    new = "a new horse battery"
    _user(env, "nurse1", "clinician")
    a, r = _login(env, "nurse1")
    assert r.status_code == 200
    b = _login(env, "nurse1")[0]  # signed in on another PC too

    def change(current: str, password: str) -> Any:
        return a.post("/v1/auth/me/password", json={"current_password": current, "password": password}, headers=CSRF)

    # A wrong current password is refused and counts toward the lock-out; a bad new one changes nothing.
    r = change("not my password", new)
    assert r.status_code == 401 and "current password is wrong" in r.json()["message"]
    assert env.api.portal.call(env.services.users.get, "nurse1").failures == 1
    assert change(PW, "short").status_code == 422 and change(PW, PW).status_code == 422
    r = change(PW, new)
    assert r.status_code == 200 and r.json() == {"ok": True, "sessions_ended": 1}, r.text
    assert a.get("/v1/auth/me").status_code == 200 and b.get("/v1/auth/me").status_code == 401
    assert _login(env, "nurse1")[1].status_code == 401 and _login(env, "nurse1", new)[1].status_code == 200
    text = json.dumps(_records(env))
    assert "/v1/auth/me/password" in text and PW not in text and new not in text
    # The user's own second factor: the password first, then a code from the device turns it on.
    assert a.post("/v1/auth/me/totp", json={"password": PW}, headers=CSRF).status_code == 401
    e = a.post("/v1/auth/me/totp", json={"password": new}, headers=CSRF).json()
    now = _fresh_step()
    r = a.post("/v1/auth/me/totp/confirm", json={"totp": totp.code_at(e["secret"], now)}, headers=CSRF)
    assert r.status_code == 200 and r.json()["totp"] is True, r.text
    assert _login(env, "nurse1", new)[1].json()["details"]["totp"] == "required"
    assert _login(env, "nurse1", new, code=totp.code_at(e["secret"], now + 30))[1].status_code == 200
    # On already: enrolling again is refused (a lost device goes through an administrator).
    assert a.post("/v1/auth/me/totp", json={"password": new}, headers=CSRF).status_code == 409
    # The root token is no user with a password.
    r = env.api.post("/v1/auth/me/password", json={"current_password": PW, "password": new})
    assert r.status_code == 403 and "not a user kept in the store" in r.json()["message"]


def test_a_secret_kept_before_sealing_still_works_and_is_sealed_at_sign_in(env: Env) -> None:
    _user(env, "old", "admin")
    now = _fresh_step()
    secret = totp.new_secret()
    users = env.services.users

    async def plain() -> None:  # as a record written before secrets were sealed
        rec, rev = await users._entry("old")
        await users._put(rec.model_copy(update={"totp_secret": secret}), rev)

    env.api.portal.call(plain)
    assert _login(env, "old")[1].status_code == 401
    assert _login(env, "old", code=totp.code_at(secret, now))[1].status_code == 200
    stored = env.api.portal.call(users.get, "old").totp_secret
    assert stored.startswith("sealed:v1:") and secret not in stored
    # Copied into another user's record, a sealed secret does not open (it names its user).
    _user(env, "thief", "admin")

    async def copy() -> None:
        rec, rev = await users._entry("thief")
        await users._put(rec.model_copy(update={"totp_secret": stored}), rev)

    env.api.portal.call(copy)
    r = _login(env, "thief", code=totp.code_at(secret, now + 30))[1]
    assert r.status_code >= 500 and "altered" in r.json()["message"], r.text


def test_missing_or_wrong_codes_lock_the_account(env: Env) -> None:
    _user(env, "ope", "operator")
    now = _fresh_step()
    secret = _enroll(env, "ope", now)
    for i in range(5):
        r = _login(env, "ope", code=None if i % 2 else "123")[1]
        assert r.status_code == 401
    r = _login(env, "ope", code=totp.code_at(secret, now))[1]
    assert r.status_code == 401 and "locked" in r.json()["message"]
    (lock,) = _records(env, action="lockout")
    assert lock["target"] == "users/ope" and lock["details"]["failures"] == 5


def test_totp_required_for_administrators(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    _user(env, "boss", "admin")
    _user(env, "boss2", "admin")
    _user(env, "ope", "operator")
    now = _fresh_step()
    secret = _enroll(env, "boss2", now)
    monkeypatch.setenv("KASOU_REQUIRE_TOTP_FOR_ADMINS", "1")
    r = _login(env, "boss")[1]
    assert r.status_code == 401 and r.json()["details"]["totp"] == "enroll", r.text
    assert "kasou user totp enroll boss" in r.json()["message"]
    assert _login(env, "ope")[1].status_code == 200  # other roles: as they choose
    assert _login(env, "boss2", code=totp.code_at(secret, now))[1].status_code == 200
    monkeypatch.setenv("KASOU_REQUIRE_TOTP_FOR_ADMINS", "0")
    assert _login(env, "boss")[1].status_code == 200


# -- break-glass ---------------------------------------------------------------------------------


@pytest.fixture
def bg_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "home" / "break-glass.json"
    monkeypatch.setenv("KASOU_BREAK_GLASS_FILE", str(path))
    return path


def test_break_glass_is_flagged_everywhere(env: Env, bg_file: Path, caplog: pytest.LogCaptureFixture) -> None:
    _user(env, "boss", "admin")
    assert _login(env, "break-glass", "x" * 25)[1].status_code == 401  # not set up yet
    # Only the root token sets it, not an administrator's session.
    boss, _ = _login(env, "boss")
    assert boss.post("/v1/users/break-glass", headers=CSRF).status_code == 403
    r = env.api.post("/v1/users/break-glass")
    assert r.status_code == 200, r.text
    pw = r.json()["password"]
    assert r.json()["replaced"] is False and len(pw) == 29
    assert stat.S_IMODE(os.stat(bg_file).st_mode) == 0o600 and pw not in bg_file.read_text()
    # Signing in: an administrator's session, flagged in the audit log, as an event and in the log.
    with caplog.at_level(logging.CRITICAL):
        bg, r = _login(env, "break-glass", pw)
    assert r.status_code == 200, r.text
    assert (r.json()["role"], r.json()["via"]) == ("admin", "break_glass")
    assert any(x.levelno == logging.CRITICAL and "BREAK-GLASS" in x.getMessage() for x in caplog.records)
    (flag,) = _records(env, action="break_glass_login")
    assert flag["details"] == {"break_glass": True} and flag["actor"]["via"] == "break_glass"
    login = [x for x in _records(env, action="login") if x["target"] == "users/break-glass"][-1]
    assert login["actor"] == {"name": "break-glass", "role": "admin", "via": "break_glass"}
    (ev,) = env.api.get("/v1/events/active").json()
    assert ev["kind"] == "break_glass_login" and ev["severity"] == "error" and "testclient" in ev["message"]
    # Everything the session does is recorded as break-glass.
    assert bg.post("/v1/networks", json={"name": "mgmt"}, headers=CSRF).status_code == 201
    rec = _records(env, action="POST /v1/networks")[-1]
    assert rec["actor"] == {"name": "break-glass", "role": "admin", "via": "break_glass"}
    assert pw not in json.dumps(_records(env))
    # The event stays until another administrator acknowledges it.
    r = bg.post("/v1/users/break-glass/acknowledge", headers=CSRF)
    assert r.status_code == 403 and env.api.get("/v1/events/active").json()
    r = boss.post("/v1/users/break-glass/acknowledge", headers=CSRF)
    assert r.json() == {"acknowledged": 1}
    assert env.api.get("/v1/events/active").json() == []
    kinds = [e["kind"] for e in env.api.get("/v1/events").json()]
    assert kinds[-2:] == ["break_glass_login", "break_glass_acknowledged"]
    ack = _records(env, action="break_glass_acknowledge")[-1]
    assert ack["actor"]["name"] == "boss" and ack["result"]["ok"] is True
    # Nobody may take its name.
    r = env.api.post("/v1/users", json={"name": "break-glass", "role": "admin", "password": PW})
    assert r.status_code == 422 and "reserved" in r.json()["message"]


def test_break_glass_rotation_and_rate_limit(env: Env, bg_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    old = env.api.post("/v1/users/break-glass").json()["password"]
    bg, r = _login(env, "break-glass", old)
    assert r.status_code == 200
    r = env.api.post("/v1/users/break-glass")
    new = r.json()["password"]
    assert r.json()["replaced"] is True and new != old
    assert _records(env, action="break_glass_rotate")[-1]["actor"]["name"] == "root"
    # The old password no longer signs in, and its sessions have ended.
    assert bg.get("/v1/auth/me").status_code == 401
    assert _login(env, "break-glass", old)[1].status_code == 401
    # Rate-limited after wrong passwords (the right one waits too), never locked for good.
    for _ in range(4):
        assert _login(env, "break-glass", "wrong-password")[1].status_code == 401
    r = _login(env, "break-glass", new)[1]
    assert r.status_code == 401 and "rate-limited" in r.json()["message"]
    # The count is in the store: a restarted server (or a new leader) goes on with it.
    store = env.services.store
    assert breakglass.BreakGlass(store) is not env.services.users.break_glass
    with pytest.raises(Unauthorized, match="rate-limited"):
        env.api.portal.call(breakglass.BreakGlass(store).check, new)
    limit = env.api.portal.call(store.get, breakglass.LIMIT_KEY).value
    assert limit["failures"] == 5
    # The wait is over; TOTP required does not apply to it.
    env.api.portal.call(store.put, breakglass.LIMIT_KEY, {**limit, "last_failure": limit["last_failure"] - 60})
    monkeypatch.setenv("KASOU_REQUIRE_TOTP_FOR_ADMINS", "1")
    assert _login(env, "break-glass", new)[1].status_code == 200
    assert len(env.api.get("/v1/events/active").json()) == 2  # two uses, neither acknowledged
    assert env.api.portal.call(store.get, breakglass.LIMIT_KEY) is None  # a right password clears the count


def test_break_glass_file_is_beside_the_store(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KASOU_BREAK_GLASS_FILE", raising=False)
    r = env.api.post("/v1/users/break-glass").json()
    assert Path(r["file"]) == env.tmp / "break-glass.json"  # the kasou home: where state.db is
    assert stat.S_IMODE(os.stat(r["file"]).st_mode) == 0o600
    assert _login(env, "break-glass", r["password"])[1].status_code == 200


# -- the CLI -------------------------------------------------------------------------------------


def test_cli_tokens_totp_break_glass(env: Env, bg_file: Path) -> None:
    runner = CliRunner()
    common.client_factory = lambda: Client("http://testserver", TOKEN, http=env.api)
    try:
        _user(env, "ope", "operator")
        r = runner.invoke(cli_app, ["user", "token", "create", "ope", "--label", "nightly", "--expires", "7"])
        assert r.exit_code == 0, r.output
        tok = r.output.strip().splitlines()[-1]
        assert tok.startswith("ksu_") and _bearer(env, tok).get("/v1/auth/me").json()["name"] == "ope"
        r = runner.invoke(cli_app, ["user", "token", "list", "ope", "--json"])
        (t,) = json.loads(r.output)
        assert t["label"] == "nightly" and tok not in r.output
        assert "nightly" in runner.invoke(cli_app, ["user", "token", "list", "ope"]).output
        r = runner.invoke(cli_app, ["user", "token", "revoke", "ope", t["id"]])
        assert r.exit_code == 0 and _bearer(env, tok).get("/v1/vms").status_code == 401
        now = _fresh_step()
        r = runner.invoke(cli_app, ["user", "totp", "enroll", "ope"])
        assert r.exit_code == 0, r.output
        secret = r.output.split("shown only now): ")[1].split()[0]
        r = runner.invoke(cli_app, ["user", "totp", "confirm", "ope", totp.code_at(secret, now - 30)])
        assert r.exit_code == 0 and "TOTP on" in r.output
        assert _login(env, "ope")[1].status_code == 401
        assert _login(env, "ope", code=totp.code_at(secret, now))[1].status_code == 200
        row = next(line for line in runner.invoke(cli_app, ["user", "list"]).output.splitlines() if "ope" in line)
        assert " on " in row and secret not in row
        r = runner.invoke(cli_app, ["user", "break-glass"])
        assert r.exit_code == 0 and "set" in r.output, r.output
        pw = r.output.strip().splitlines()[-2]
        assert _login(env, "break-glass", pw)[1].status_code == 200
        r = runner.invoke(cli_app, ["user", "break-glass-ack"])
        assert r.exit_code == 0 and "1 break-glass use acknowledged" in r.output
    finally:
        common.client_factory = None


# -- concurrent guesses ----------------------------------------------------------------------------


def _at_once(env: Env, attempts: list[tuple[dict[str, Any], str]]) -> list[httpx.Response]:
    """Sign-in attempts sent all at once, each ``(body, source address)`` from its own client."""

    async def one(body: dict[str, Any], source: str) -> httpx.Response:
        transport = httpx.ASGITransport(app=env.api.app, client=(source, 40000))
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as c:
            return await c.post("/v1/auth/login", json=body)

    async def gather() -> list[httpx.Response]:
        return list(await asyncio.gather(*(one(b, s) for b, s in attempts)))

    return env.api.portal.call(gather)


def test_concurrent_wrong_totp_codes_lock_the_account_and_it_stays_locked(env: Env) -> None:
    _user(env, "ope", "operator")
    now = _fresh_step()
    secret = _enroll(env, "ope", now)
    good = totp.code_at(secret, now)
    wrong = next(c for c in ("000000", "111111", "222222") if c not in {good, totp.code_at(secret, now + 30)})
    rs = _at_once(env, [({"name": "ope", "password": PW, "totp": wrong}, f"10.6.0.{i}") for i in range(50)])
    assert all(r.status_code == 401 for r in rs), [r.text for r in rs]
    msgs = [r.json()["message"] for r in rs]
    assert sum("TOTP code is wrong" in m for m in msgs) <= 5, msgs
    assert sum("locked" in m for m in msgs) >= 45, msgs
    users = env.services.users
    until = env.api.portal.call(users.get, "ope").locked_until
    assert until is not None and until > time.time() + 250
    rs = _at_once(env, [({"name": "ope", "password": PW, "totp": wrong}, f"10.7.0.{i}") for i in range(3)])
    assert all("locked" in r.json()["message"] for r in rs)
    assert env.api.portal.call(users.get, "ope").locked_until == until
    assert env.api.get("/v1/users").json()[0]["locked"] is True
    (r,) = _at_once(env, [({"name": "ope", "password": PW, "totp": good}, "10.8.0.1")])
    assert r.status_code == 401 and "locked" in r.json()["message"], r.text


def test_concurrent_break_glass_guesses_stay_within_the_limit(env: Env, bg_file: Path) -> None:
    """Two API servers (two BreakGlass objects on one store) take guesses at once: the limit is one count."""
    right = env.api.post("/v1/users/break-glass").json()["password"]
    store = env.services.store
    servers = [breakglass.BreakGlass(store), breakglass.BreakGlass(store)]

    async def guess(i: int) -> str:
        try:
            await servers[i % 2].check(f"wrong-{i:02d}-password-abcde")
        except Unauthorized as e:
            return e.message
        return "signed in"

    async def gather() -> list[str]:
        return list(await asyncio.gather(*(guess(i) for i in range(50))))

    msgs = env.api.portal.call(gather)
    assert "signed in" not in msgs
    assert msgs.count("wrong user name or password") <= breakglass.LIMIT_AFTER, msgs
    assert sum("rate-limited" in m for m in msgs) >= 50 - breakglass.LIMIT_AFTER
    limit = env.api.portal.call(store.get, breakglass.LIMIT_KEY).value
    assert limit["failures"] >= breakglass.LIMIT_AFTER
    # The right password waits too, on either server, and over the API.
    for s in servers:
        with pytest.raises(Unauthorized, match="rate-limited"):
            env.api.portal.call(s.check, right)
    (r,) = _at_once(env, [({"name": "break-glass", "password": right}, "10.9.0.1")])
    assert r.status_code == 401 and "rate-limited" in r.json()["message"], r.text
