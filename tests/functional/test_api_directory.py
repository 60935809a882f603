"""Directory sign-in through the API, on the fake directory (tests/doubles/directory.py, which passes the same
contract as Samba AD and slapd): set-up, group mapping, sign-in, re-checks, the directory unreachable."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from kasou.api.client import Client
from kasou.cli import common
from kasou.cli.main import app as cli_app
from kasou.config import require_totp_for
from kasou.control.directory import CONFIG_KEY, Directory
from kasou.errors import InvalidSetting
from tests.doubles.directory import BASE_DN, SERVICE_DN, SERVICE_PASSWORD, URL, FakeTree
from tests.functional.conftest import TOKEN, Env

PW = "Directory-Pw-123"
LOCAL_PW = "correct horse battery"
WRONG = "wrong user name or password"
SET = {"urls": [URL], "base_dn": BASE_DN, "bind_user": SERVICE_DN, "bind_password": SERVICE_PASSWORD}


@pytest.fixture
def tree(env: Env, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeTree]:
    t = FakeTree()
    t.add_user("alice", PW, "kasou-ops", display_name="Alice Tanaka")
    t.add_user("bob", PW, "lab-staff")
    t.add_member("kasou-vendors-lab", t.group_dn("lab-staff"))
    t.add_user("carol", PW, "kasou-ops", disabled=True)
    t.add_user("dave", PW, "kasou-ops", state="expired")
    t.add_user("eve", PW, "canteen")
    t.add_user("hiro", PW, "kasou-ops", "kasou-auditors", "kasou-vendors-lab", "ward-a-staff")
    monkeypatch.setattr(Directory, "connect", t.client)
    monkeypatch.setenv("KASOU_SIGNIN_RATE", "0")  # these tests sign in often from one address
    r = env.api.put("/v1/directory", json=SET)
    assert r.status_code == 200, r.text
    for group, body in {"kasou-ops": {"role": "operator"}, "kasou-auditors": {"role": "auditor"},
                        "kasou-vendors-lab": {"role": "vendor", "departments": ["lab"]},
                        "ward-a-staff": {"role": "clinician", "pools": ["ward-a"]}}.items():  # fmt: skip
        r = env.api.put(f"/v1/directory/mappings/{group}", json=body)
        assert r.status_code == 200, r.text
    yield t


def _login(env: Env, name: str, password: str = PW, **kw: Any) -> tuple[TestClient, Any]:
    c = env.client()
    return c, c.post("/v1/auth/login", json={"name": name, "password": password, **kw})


def _records(env: Env, action: str) -> list[dict[str, Any]]:
    r = env.api.get("/v1/audit/records", params={"action": action})
    assert r.status_code == 200, r.text
    return [x for x in r.json() if x["action"] == action]


def test_a_directory_user_signs_in_with_the_role_of_their_groups(env: Env, tree: FakeTree) -> None:
    c, r = _login(env, "alice")
    assert r.status_code == 200, r.text
    me = r.json()
    assert (me["role"], me["source"], me["groups"]) == ("operator", "directory", ["kasou-ops"])
    assert c.get("/v1/auth/me").json()["source"] == "directory"
    assert c.get("/v1/hosts").status_code == 200  # an operator's right
    users = {u["name"]: u for u in env.api.get("/v1/users").json()}
    assert users["alice"]["source"] == "directory" and users["alice"]["display_name"] == "Alice Tanaka"
    login = _records(env, "login")[-1]
    assert login["details"]["source"] == "directory" and login["details"]["groups"] == ["kasou-ops"]
    # nested groups: bob is in lab-staff, which is in kasou-vendors-lab
    _c, r = _login(env, "bob")
    assert (r.json()["role"], r.json()["departments"]) == ("vendor", ["lab"]), r.text
    # several groups: the most powerful role; pools of every group
    _c, r = _login(env, "hiro")
    assert (r.json()["role"], r.json()["pools"], r.json()["departments"]) == ("operator", ["ward-a"], [])
    # a local user signs in as always, and is marked local
    env.api.post("/v1/users", json={"name": "nurse", "role": "clinician", "password": LOCAL_PW})
    _c, r = _login(env, "nurse", LOCAL_PW)
    assert r.json()["source"] == "local"


def test_refusals_are_one_clear_line_and_unknown_names_answer_as_before(env: Env, tree: FakeTree) -> None:
    _c, unknown_before = _login(env, "zed", "whatever-password")
    _c, r = _login(env, "alice", "not-her-password")
    assert (r.status_code, r.json()["message"]) == (401, WRONG)
    assert (unknown_before.status_code, unknown_before.json()["message"]) == (401, WRONG)
    _c, r = _login(env, "carol")
    assert r.status_code == 401 and "disabled" in r.json()["message"]
    _c, r = _login(env, "carol", "not-her-password")
    assert r.json()["message"] == WRONG  # the account's state only with the right password
    _c, r = _login(env, "dave")
    assert r.status_code == 401 and "expired" in r.json()["message"]
    _c, r = _login(env, "eve")
    assert r.status_code == 401 and r.json()["message"].startswith("no kasou role for 'eve'")
    assert "kasou directory map" in r.json()["message"]
    # a name neither kasou nor the directory has locks as before (ghost lock-out)
    for _ in range(4):
        _login(env, "zed", "whatever-password")
    _c, r = _login(env, "zed", "whatever-password")
    assert r.status_code == 401 and "locked" in r.json()["message"]
    # a directory user's wrong passwords lock their kasou record the same way
    for _ in range(4):
        _login(env, "alice", "not-her-password")
    _c, r = _login(env, "alice")
    assert r.status_code == 401 and "locked" in r.json()["message"], r.text


def test_the_record_follows_the_directory_at_each_sign_in(env: Env, tree: FakeTree) -> None:
    assert _login(env, "alice")[1].json()["role"] == "operator"
    tree.add_member("kasou-vendors-lab", tree.users["alice"].dn)
    tree.remove_member("kasou-ops", tree.users["alice"].dn)
    r = _login(env, "alice")[1]
    assert (r.json()["role"], r.json()["departments"]) == ("vendor", ["lab"])
    change = _records(env, "directory_role_change")[-1]
    assert change["details"]["from"]["role"] == "operator" and change["details"]["to"]["role"] == "vendor"
    # kasou keeps no password for them, and an administrator cannot set one
    assert env.api.post("/v1/users/alice/password", json={"password": "a-local-password"}).status_code == 409
    assert _login(env, "bob")[1].status_code == 200
    r = env.api.put("/v1/users/bob/departments", json={"departments": ["pacs"]})  # the directory's groups decide
    assert r.status_code == 409 and "kasou directory map" in r.json()["message"]
    assert env.api.put("/v1/users/bob/pools", json={"pools": ["ward-a"]}).status_code == 409
    _c, r = _login(env, "ALICE")  # AD's names are without case: the same record
    assert r.status_code == 200 and r.json()["name"] == "alice"
    _c, r = _login(env, "Bob")  # a first sign-in in another case too
    assert r.status_code == 200 and r.json()["name"] == "bob"
    # a local user's name in another case is still no one's, and user@domain is not a kasou name
    env.api.post("/v1/users", json={"name": "nurse", "role": "clinician", "password": LOCAL_PW})
    tree.add_user("nurse", LOCAL_PW, "kasou-ops")
    assert _login(env, "NURSE", LOCAL_PW)[1].json()["message"] == WRONG
    assert _login(env, "nurse", LOCAL_PW)[1].json()["source"] == "local"  # the local record wins
    assert _login(env, "alice@kasou.test")[1].json()["message"] == WRONG


def _age_check(env: Env, name: str) -> None:
    """Make the user's last directory check old enough for a re-check to be due."""
    users = env.services.users
    env.api.portal.call(users._update, name, lambda r: r.model_copy(update={"dir_checked": time.time() - 10_000}))  # type: ignore[union-attr]


def test_sessions_and_tokens_are_rechecked_against_the_directory(env: Env, tree: FakeTree) -> None:
    c, r = _login(env, "alice")
    token = env.api.post("/v1/users/alice/tokens", json={"label": "script"}).json()["token"]
    bearer = env.client(headers={"Authorization": f"Bearer {token}"})
    assert bearer.get("/v1/hosts").status_code == 200
    # not due yet: nothing is asked of the directory
    calls = tree.calls
    assert c.get("/v1/auth/me").status_code == 200 and tree.calls == calls
    # a changed grant takes effect at the re-check, and is audited
    tree.remove_member("kasou-ops", tree.users["alice"].dn)
    tree.add_member("kasou-auditors", tree.users["alice"].dn)
    _age_check(env, "alice")
    assert c.get("/v1/auth/me").json()["role"] == "auditor"
    assert _records(env, "directory_role_change")[-1]["details"]["at"] == "re-check"
    # removed from every mapped group: the session ends, the token is refused
    tree.remove_member("kasou-auditors", tree.users["alice"].dn)
    _age_check(env, "alice")
    r = bearer.get("/v1/hosts")
    assert r.status_code == 401 and "mapped" in r.json()["message"], r.text
    assert c.get("/v1/auth/me").status_code == 401
    assert _records(env, "directory_revoked")
    # back in a group: a sign-in lets them in again, tokens included
    tree.add_member("kasou-ops", tree.users["alice"].dn)
    assert _login(env, "alice")[1].status_code == 200
    assert bearer.get("/v1/hosts").status_code == 200
    # a disabled account's sessions end at the next re-check
    c2, _ = _login(env, "alice")
    tree.users["alice"].disabled = True
    _age_check(env, "alice")
    r = c2.get("/v1/auth/me")
    assert r.status_code == 401 and "disabled" in r.json()["message"]


def test_the_directory_unreachable(env: Env, tree: FakeTree) -> None:
    env.api.post("/v1/users", json={"name": "nurse", "role": "clinician", "password": LOCAL_PW})
    c, r = _login(env, "alice")
    assert r.status_code == 200
    assert env.client().get("/v1/directory/status").json() == {"directory": "ok"}
    tree.reachable = False
    _c, r = _login(env, "bob")  # a first sign-in
    assert r.status_code == 503 and r.json()["message"] == ("the directory cannot be reached: local accounts and "
                                                            "break-glass still work")  # fmt: skip
    _c, r = _login(env, "alice")  # a known directory user
    assert r.status_code == 503 and "cannot be reached" in r.json()["message"]
    assert _login(env, "nurse", LOCAL_PW)[1].status_code == 200  # local users: as always
    # the session of a directory user continues (its re-check finds no directory)
    _age_check(env, "alice")
    assert c.get("/v1/auth/me").status_code == 200
    active = [e for e in env.api.get("/v1/events/active").json() if e["kind"] == "directory_unreachable"]
    assert len(active) == 1
    # the public status says it, and nothing else
    env.services.users.directory._status_at = 0.0
    anon = env.client()
    assert anon.get("/v1/directory/status").json() == {"directory": "unreachable"}
    tree.reachable = True
    env.services.users.directory._status_at = 0.0
    assert anon.get("/v1/directory/status").json() == {"directory": "ok"}
    assert not [e for e in env.api.get("/v1/events/active").json() if e["kind"] == "directory_unreachable"]
    assert _login(env, "bob")[1].status_code == 200


def test_set_refuses_what_it_cannot_use_and_changes_nothing(env: Env, tree: FakeTree) -> None:
    before = env.api.get("/v1/directory").json()
    assert "bind_password" not in before and before["bind_user"] == SERVICE_DN
    r = env.api.put("/v1/directory", json={**SET, "urls": ["ldap://dc1.hospital.local"]})
    assert r.status_code == 422 and "plain text" in r.json()["message"] and "--starttls" in r.json()["message"]
    r = env.api.put("/v1/directory", json={**SET, "bind_password": "wrong"})
    assert r.status_code == 503 and "service account" in r.json()["message"]
    r = env.api.put("/v1/directory", json={**SET, "user_filter": "(uid=x)"})
    assert r.status_code == 422 and "{name}" in r.json()["message"]
    assert env.api.get("/v1/directory").json()["mappings"] == before["mappings"]
    e = env.api.portal.call(env.services.store.get, CONFIG_KEY)  # type: ignore[union-attr]
    stored = dict(e.value)
    assert stored["bind_password"].startswith("sealed:v1:") and SERVICE_PASSWORD not in str(stored)
    r = env.api.put("/v1/directory/mappings/x", json={"role": "vendor"})
    assert r.status_code == 422 and "department" in r.json()["message"]
    assert env.api.delete("/v1/directory/mappings/nope").status_code == 404
    # not for operators
    env.api.post("/v1/users", json={"name": "ope", "role": "operator", "password": LOCAL_PW})
    c, _ = _login(env, "ope", LOCAL_PW)
    assert c.get("/v1/directory").status_code == 403


def test_totp_required_for_roles_applies_to_directory_users(
    env: Env, tree: FakeTree, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KASOU_REQUIRE_TOTP_FOR", "operator,vendor")
    _c, r = _login(env, "alice")
    assert r.status_code == 401 and r.json()["details"]["totp"] == "enroll", r.text
    assert "kasou user totp enroll alice" in r.json()["message"]
    monkeypatch.setenv("KASOU_REQUIRE_TOTP_FOR", "admin,nurse")
    with pytest.raises(InvalidSetting) as e:
        require_totp_for()
    assert "KASOU_REQUIRE_TOTP_FOR" in e.value.message and "nurse is no role" in e.value.message
    monkeypatch.setenv("KASOU_REQUIRE_TOTP_FOR", "")
    monkeypatch.setenv("KASOU_REQUIRE_TOTP_FOR_ADMINS", "1")
    assert require_totp_for() == {"admin"}


def test_the_cli(env: Env, tree: FakeTree, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(common, "client_factory", lambda: Client("http://testserver", TOKEN, http=env.api))
    run = CliRunner().invoke
    r = run(cli_app, ["directory", "show"])
    assert r.exit_code == 0 and "directory sign-in: on" in r.output and "kasou-vendors-lab" in r.output, r.output
    r = run(cli_app, ["directory", "test", "bob", "--json"])
    assert r.exit_code == 0, r.output
    assert '"role": "vendor"' in r.output and "lab-staff" in r.output
    r = run(cli_app, ["directory", "test", "bob", "--password-stdin"], input=PW + "\n")
    assert r.exit_code == 0 and "bind:         ok" in r.output, r.output
    r = run(cli_app, ["directory", "map", "CN=Ward B,CN=Users," + BASE_DN, "--role", "clinician", "--pool", "ward-b"])
    assert r.exit_code == 0, r.output
    r = run(cli_app, ["directory", "unmap", "CN=Ward B,CN=Users," + BASE_DN])
    assert r.exit_code == 0, r.output
    _login(env, "alice")
    r = run(cli_app, ["user", "list", "--json"])
    assert '"source": "directory"' in r.output
    r = run(cli_app, ["directory", "off", "--json"])
    assert r.exit_code == 0 and '"was_on": true' in r.output
    assert run(cli_app, ["directory", "show"]).output.strip() == "directory sign-in: off"
