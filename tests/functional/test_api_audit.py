"""The audit log through the API with the fake driver: what each request leaves, who may read it, the CLI."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from fastapi.testclient import TestClient
from typer.testing import CliRunner

from kasou.api.audit import sign_forwarded
from kasou.api.client import Client
from kasou.cli import common
from kasou.cli.main import app as cli_app
from kasou.control.audit import chain
from tests.functional.conftest import TOKEN, Env

PW = "correct horse battery"
ROOT = {"name": "root", "role": "admin", "via": "token"}


def records(env: Env, **params: Any) -> list[dict[str, Any]]:
    r = env.api.get("/v1/audit/records", params=params)
    assert r.status_code == 200, r.text
    return list(r.json())


def one_more(env: Env, before: int) -> dict[str, Any]:
    """The request just made left exactly one record: that record."""
    recs = records(env)
    assert len(recs) == before + 1, [r["action"] for r in recs[before:]]
    return recs[-1]


def session(env: Env, name: str, password: str = PW) -> TestClient:
    c = env.client(base_url="http://testserver")
    r = c.post("/v1/auth/login", json={"name": name, "password": password})
    assert r.status_code == 200, r.text
    return c


def test_every_change_leaves_one_record(env: Env) -> None:
    n = 0

    def check(method: str, path: str, status: int, action: str, target: str, **kw: Any) -> dict[str, Any]:
        nonlocal n
        r = env.api.request(method, path, **kw)
        assert r.status_code == status, r.text
        rec = one_more(env, n)
        n += 1
        assert (rec["action"], rec["target"], rec["actor"]) == (action, target, ROOT), rec
        assert rec["result"]["status"] == status and rec["result"]["ok"] is (status < 400)
        assert rec["source"] == "testclient" and rec["host"]
        answer = r.json() if r.content and r.headers.get("content-type", "").startswith("application/json") else None
        if isinstance(answer, dict) and answer.get("job"):
            assert rec["details"]["job"] == answer["job"]["id"]
            env.wait(answer["job"])
        return rec

    rec = check("POST", "/v1/vms", 202, "POST /v1/vms", "vms/emr1",
                json={"name": "emr1", "image": "tiny", "vcpus": 1, "memory_mib": 128})  # fmt: skip
    assert rec["details"]["body"]["memory_mib"] == 128
    env.api.get("/v1/vms")  # reads are not recorded
    env.api.get("/v1/vms/emr1")
    check("PATCH", "/v1/vms/emr1", 200, "PATCH /v1/vms/emr1", "vms/emr1", json={"description": "EMR"})
    rec = check("POST", "/v1/vms/emr1/actions/start", 202, "POST /v1/vms/emr1/actions/start", "vms/emr1")
    rec = check("POST", "/v1/vms/emr1/actions/stop", 202, "POST /v1/vms/emr1/actions/stop", "vms/emr1",
                params={"timeout": 5})  # fmt: skip
    assert rec["details"]["query"] == {"timeout": "5"}
    check("POST", "/v1/networks", 201, "POST /v1/networks", "networks/clin", json={"name": "clin", "vlan": 10})
    check("DELETE", "/v1/networks/clin", 200, "DELETE /v1/networks/clin", "networks/clin")
    check("POST", "/v1/users", 201, "POST /v1/users", "users/ope", json={"name": "ope", "role": "operator",
                                                                        "password": PW})  # fmt: skip
    check("PUT", "/v1/users/ope/pools", 200, "PUT /v1/users/ope/pools", "users/ope", json={"pools": ["ward3"]})
    check("POST", "/v1/users/ope/password", 200, "POST /v1/users/ope/password", "users/ope", json={"password": PW})
    check("DELETE", "/v1/users/ope", 204, "DELETE /v1/users/ope", "users/ope")
    rec = check("POST", "/v1/hosts/nohost/maintenance", 404, "POST /v1/hosts/nohost/maintenance", "hosts/nohost")
    assert rec["result"]["code"] == "not_found" and "nohost" in rec["result"]["message"]
    rec = check("POST", "/v1/vms", 422, "POST /v1/vms", "vms/bad name", json={"name": "bad name", "image": "tiny"})
    assert rec["result"]["ok"] is False and rec["result"]["code"]
    check("DELETE", "/v1/vms/emr1", 202, "DELETE /v1/vms/emr1", "vms/emr1", params={"force": "true"})
    assert env.api.get("/v1/audit/verify").json()["ok"] is True


def test_sign_in_failures_lockout_and_refusals(env: Env) -> None:
    assert env.api.post("/v1/users", json={"name": "ope", "role": "operator", "password": PW}).status_code == 201
    anon = env.client()
    before = len(records(env))
    op = session(env, "ope")
    rec = one_more(env, before)
    assert (rec["action"], rec["target"], rec["actor"]) == ("login", "users/ope", {"name": "ope", "role": "operator",
                                                                                  "via": "session"})  # fmt: skip
    assert "body" not in rec["details"]
    # Refused: no credentials (401, no actor); the operator may not manage users (403, the actor known).
    before = len(records(env))
    assert anon.post("/v1/vms", json={"name": "x", "image": "tiny"}).status_code == 401
    rec = one_more(env, before)
    assert rec["actor"] is None and rec["result"]["status"] == 401 and rec["result"]["code"] == "unauthorized"
    r = op.post("/v1/users", json={"name": "z", "role": "admin", "password": PW}, headers={"x-kasou-csrf": "1"})
    assert r.status_code == 403
    rec = one_more(env, before + 1)
    assert rec["actor"] == {"name": "ope", "role": "operator", "via": "session"} and rec["result"]["status"] == 403
    assert op.post("/v1/auth/logout", headers={"x-kasou-csrf": "1"}).status_code == 200
    assert records(env)[-1]["action"] == "logout" and records(env)[-1]["actor"]["name"] == "ope"
    # Five wrong passwords: five failed sign-ins and one lock-out.
    before = len(records(env))
    for _ in range(5):
        assert anon.post("/v1/auth/login", json={"name": "ope", "password": "wrong password!"}).status_code == 401
    recs = records(env)[before:]
    assert [r["action"] for r in recs] == ["login_failed"] * 4 + ["lockout", "login_failed"]
    assert all(r["target"] == "users/ope" and r["actor"] is None for r in recs)
    assert recs[4]["details"] == {"failures": 5, "locked_s": 300.0} and recs[4]["source"] == "testclient"
    assert anon.post("/v1/auth/login", json={"name": "ope", "password": PW}).status_code == 401
    rec = records(env)[-1]
    assert rec["action"] == "login_failed" and "locked" in rec["result"]["message"]
    assert len(records(env, action="login_failed")) == 6 and len(records(env, action="lockout")) == 1


def test_secrets_never_reach_the_log(env: Env) -> None:
    env.api.post("/v1/users", json={"name": "boss", "role": "admin", "password": PW})
    c = env.client(base_url="http://testserver")
    r = c.post("/v1/auth/login", json={"name": "boss", "password": PW})
    cookie = r.cookies.get("kasou_session")
    assert cookie
    c.post("/v1/auth/login", json={"name": "boss", "password": PW + "x"})
    c.post("/v1/users/boss/password", json={"password": PW + "-new"}, headers={"x-kasou-csrf": "1"})
    c.post("/v1/auth/logout", headers={"x-kasou-csrf": "1"})
    for fmt in ("csv", "json"):
        text = env.api.get("/v1/audit/export", params={"format": fmt}).text
        assert "boss" in text
        for secret in (PW, TOKEN, cookie):
            assert secret not in text, (fmt, secret)
    assert "[redacted]" in env.api.get("/v1/audit/export").text


def test_who_may_read_the_audit_log(env: Env) -> None:
    for name, role in (("aud", "auditor"), ("ope", "operator"), ("nurse", "clinician")):
        assert env.api.post("/v1/users", json={"name": name, "role": role, "password": PW}).status_code == 201
    aud, op, nurse = session(env, "aud"), session(env, "ope"), session(env, "nurse")
    me = aud.get("/v1/auth/me").json()
    assert me["role"] == "auditor" and set(me["permissions"]) == {"read", "vm.read", "audit"}
    for path in ("/v1/audit/records", "/v1/audit/verify", "/v1/audit/export", "/v1/audit/public-key",
                 "/v1/audit/status", "/v1/reports/uptime", "/v1/vms"):  # fmt: skip
        assert aud.get(path).status_code == 200, path
        if path.startswith("/v1/audit"):
            assert op.get(path).status_code == 403, path
            assert nurse.get(path).status_code == 403, path
    # An auditor changes nothing; the refusal is itself recorded.
    r = aud.post("/v1/vms", json={"name": "a", "image": "tiny"}, headers={"x-kasou-csrf": "1"})
    assert r.status_code == 403
    assert records(env)[-1]["actor"]["name"] == "aud" and records(env)[-1]["result"]["status"] == 403
    assert aud.delete("/v1/users/ope", headers={"x-kasou-csrf": "1"}).status_code == 403
    assert aud.post("/v1/audit/checkpoint", headers={"x-kasou-csrf": "1"}).json()["key_id"]
    assert "BEGIN PUBLIC KEY" in aud.get("/v1/audit/public-key").text


def test_forwarded_request_keeps_the_client_address(env: Env) -> None:
    signed = sign_forwarded(TOKEN, "10.9.8.7", "POST", "/v1/networks")
    env.api.post("/v1/networks", json={"name": "img", "vlan": 20}, headers=signed)
    rec = records(env)[-1]
    assert rec["source"] == "10.9.8.7" and rec["details"]["forwarded_by"] == "testclient"


def test_a_forwarded_address_without_the_sites_signature_is_not_believed(env: Env) -> None:
    """Only a follower (it holds the site's API token) may say whose request it forwards."""
    stale = sign_forwarded(TOKEN, "10.9.8.7", "POST", "/v1/networks", now=time.time() - 600)
    other_key = sign_forwarded("not-the-token", "10.9.8.7", "POST", "/v1/networks")
    other_path = sign_forwarded(TOKEN, "10.9.8.7", "POST", "/v1/pools")
    for n, headers in enumerate(({"x-kasou-forwarded-for": "10.9.8.7"}, stale, other_key, other_path)):
        env.api.post("/v1/networks", json={"name": f"n{n}", "vlan": 30 + n}, headers=headers)
        rec = records(env)[-1]
        assert rec["source"] == "testclient", (n, rec)
        assert rec["details"]["forwarded_for_unverified"] == "10.9.8.7" and "forwarded_by" not in rec["details"]


def test_cli_verify_list_export(env: Env, tmp_path: Path) -> None:
    runner = CliRunner()
    common.client_factory = lambda: Client("http://testserver", TOKEN, http=env.api)
    try:
        env.create("lab1")
        env.api.post("/v1/audit/checkpoint")
        r = runner.invoke(cli_app, ["audit", "verify"])
        assert r.exit_code == 0 and "intact" in r.output, r.output
        r = runner.invoke(cli_app, ["audit", "list", "--target", "vms/lab1", "--json"])
        assert r.exit_code == 0 and [x["action"] for x in json.loads(r.output)] == ["POST /v1/vms"]
        r = runner.invoke(cli_app, ["audit", "list", "--actor", "root", "--since", "2000-01-01T00:00:00"])
        assert r.exit_code == 0 and "seq" in r.output
        out = tmp_path / "audit.csv"
        r = runner.invoke(cli_app, ["audit", "export", "--format", "csv", "--output", str(out)])
        assert r.exit_code == 0 and out.read_text().startswith("seq,time,host")
        r = runner.invoke(cli_app, ["audit", "export", "--format", "json"])
        exported = json.loads(r.output)
        assert exported["records"] and exported["checkpoints"] and "BEGIN PUBLIC KEY" in exported["public_key"]
        # Someone edits record 1 in the store: verify fails and says where.
        store = env.services.store
        e = env.api.portal.call(store.get, chain.seq_key(1))
        v = dict(e.value)
        v["actor"] = {"name": "nobody", "role": "admin", "via": "token"}
        env.api.portal.call(store.put, chain.seq_key(1), v)
        r = runner.invoke(cli_app, ["audit", "verify"])
        assert r.exit_code == 1 and "edited at seq 1" in r.output, r.output
        r = runner.invoke(cli_app, ["audit", "verify", "--json"])
        assert r.exit_code == 1 and json.loads(r.stdout)["problem"]["kind"] == "edited"
    finally:
        common.client_factory = None


def test_cli_verify_holds_the_store_against_the_anchor_file(env: Env) -> None:
    """`kasou audit checkpoint` anchors the checkpoint beside the store (0600); deleting the records after it
    together with every checkpoint in the store is then found by `kasou audit verify`."""
    runner = CliRunner()
    common.client_factory = lambda: Client("http://testserver", TOKEN, http=env.api)
    try:
        env.create("lab1")
        for text in ("EMR", "LIS", "RIS"):
            assert env.api.patch("/v1/vms/lab1", json={"description": text}).status_code == 200
        r = runner.invoke(cli_app, ["audit", "checkpoint"])
        assert r.exit_code == 0 and "checkpoint at 4" in r.output, r.output
        anchor = env.tmp / "audit-anchors.jsonl"
        assert anchor.stat().st_mode & 0o777 == 0o600 and len(anchor.read_text().splitlines()) == 1
        sealed = json.loads(anchor.read_text())["seq"]
        r = runner.invoke(cli_app, ["audit", "verify", "--json"])
        rep = json.loads(r.stdout)
        assert r.exit_code == 0 and (rep["anchor_file"], rep["anchors"], rep["last_anchor"]) == (str(anchor), 1, 4)
        store = env.services.store
        for e in env.api.portal.call(store.range, chain.CHECKPOINT_PREFIX):
            env.api.portal.call(store.delete, e.key)
        for seq in range(sealed - 1, sealed + 3):
            env.api.portal.call(store.delete, chain.seq_key(seq))
        r = runner.invoke(cli_app, ["audit", "verify"])
        assert r.exit_code == 1 and f"truncated at seq {sealed - 1}" in r.output, r.output
    finally:
        common.client_factory = None
