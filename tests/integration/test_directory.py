"""Directory sign-in end to end against a real Samba AD domain controller and a real OpenLDAP slapd (each in a
network namespace of its own, tests/ldapservers.py): kasou set up through its API with the test CA, groups
mapped, users signing in (nested groups, a disabled account, a password that must change), a wrong CA refused,
and the directory cut off while a local user still signs in."""

from __future__ import annotations

import statistics
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from tests.functional import conftest as functional
from tests.functional.conftest import Env
from tests.ldapservers import PASSWORD, SERVICE_PASSWORD, DirectoryCA, Server

pytestmark = [pytest.mark.directory, pytest.mark.shares_machine]  # scripts/test.sh runs these beside the fast tests
env = functional.env  # the in-process API on the fake driver (a fixture)
LOCAL_PW = "correct horse battery"


@pytest.fixture(params=["samba", "slapd"])
def server(request: pytest.FixtureRequest) -> Server:
    s: Server = request.getfixturevalue("samba_dc" if request.param == "samba" else "slapd_server")
    return s


def _body(s: Server, **kw: Any) -> dict[str, Any]:
    return {"urls": [s.url], "base_dn": s.base_dn, "bind_user": s.bind_user, "bind_password": SERVICE_PASSWORD,
            "ca_pem": s.ca.pem, "user_filter": s.user_filter, **kw}  # fmt: skip


@pytest.fixture
def kasou_dir(env: Env, server: Server, monkeypatch: pytest.MonkeyPatch) -> Iterator[Env]:
    monkeypatch.setenv("KASOU_SIGNIN_RATE", "0")
    r = env.api.put("/v1/directory", json=_body(server))
    assert r.status_code == 200, r.text
    for group, m in {"kasou-ops": {"role": "operator"},
                     "kasou-vendors-lab": {"role": "vendor", "departments": ["lab"]}}.items():  # fmt: skip
        assert env.api.put(f"/v1/directory/mappings/{group}", json=m).status_code == 200
    yield env


def _login(env: Env, name: str, password: str = PASSWORD) -> tuple[TestClient, Any]:
    c = env.client()
    return c, c.post("/v1/auth/login", json={"name": name, "password": password})


def test_sign_in_with_group_roles_nested_groups_and_refusals(kasou_dir: Env, server: Server) -> None:
    env = kasou_dir
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        c, r = _login(env, "alice")
        times.append((time.perf_counter() - t0) * 1000)
        assert r.status_code == 200, r.text
    me = c.get("/v1/auth/me").json()
    assert (me["role"], me["source"], me["groups"]) == ("operator", "directory", ["kasou-ops"])
    print(f"\n{server.kind}: directory sign-in {statistics.median(times):.0f} ms median of 5 "
          f"(first {times[0]:.0f} ms); server ready in {server.start_s:.1f} s")  # fmt: skip
    _c, r = _login(env, "bob")  # lab-staff, inside kasou-vendors-lab
    assert (r.json()["role"], r.json()["departments"]) == ("vendor", ["lab"]), r.text
    _c, r = _login(env, "eve")
    assert r.status_code == 401 and r.json()["message"].startswith("no kasou role for 'eve'")
    _c, r = _login(env, "alice", "not-the-password")
    assert (r.status_code, r.json()["message"]) == (401, "wrong user name or password")
    _c, r = _login(env, "nobody-here")
    assert (r.status_code, r.json()["message"]) == (401, "wrong user name or password")
    test = env.api.post("/v1/directory/test", json={"user": "bob", "password": PASSWORD}).json()
    assert test["bind"] == "ok" and {g["name"] for g in test["groups"]} == {"lab-staff", "kasou-vendors-lab"}
    if "disabled" in server.features:
        _c, r = _login(env, "carol")
        assert r.status_code == 401 and "disabled" in r.json()["message"], r.text
        _c, r = _login(env, "dave")
        assert r.status_code == 401 and "must be changed" in r.json()["message"], r.text


def test_a_wrong_ca_is_refused_and_changes_nothing(kasou_dir: Env, server: Server) -> None:
    other = DirectoryCA.make("not the directory's CA")
    r = kasou_dir.api.put("/v1/directory", json=_body(server, ca_pem=other.pem))
    assert r.status_code == 503 and "not trusted" in r.json()["message"], r.text
    r = kasou_dir.api.put("/v1/directory", json=_body(server, ca_pem=None))  # the system's CAs do not know it
    assert r.status_code == 503 and "not trusted" in r.json()["message"], r.text
    assert _login(kasou_dir, "alice")[1].status_code == 200  # still the right CA


def test_the_directory_cut_off(kasou_dir: Env, server: Server) -> None:
    env = kasou_dir
    env.api.post("/v1/users", json={"name": "nurse", "role": "clinician", "password": LOCAL_PW})
    c, r = _login(env, "alice")
    assert r.status_code == 200
    subprocess.run(["ip", "link", "set", server.ns.host_if, "down"], check=True)
    try:
        t0 = time.monotonic()
        _c, r = _login(env, "bob")
        assert r.status_code == 503 and "local accounts and break-glass still work" in r.json()["message"], r.text
        assert time.monotonic() - t0 < 20
        _c, r = _login(env, "nurse", LOCAL_PW)
        assert r.status_code == 200 and r.json()["source"] == "local"
        assert c.get("/v1/auth/me").status_code == 200  # the directory user's session continues
        env.services.users.directory._status_at = 0.0
        assert env.client().get("/v1/directory/status").json() == {"directory": "unreachable"}
        kinds = [e["kind"] for e in env.api.get("/v1/events/active").json()]
        assert kinds.count("directory_unreachable") == 1
    finally:
        subprocess.run(["ip", "link", "set", server.ns.host_if, "up"], check=True)
    deadline = time.monotonic() + 20
    while _login(env, "bob")[1].status_code != 200:
        assert time.monotonic() < deadline, "the directory did not answer again"
        time.sleep(0.5)
