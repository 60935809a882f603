"""Hostile input through the API: every answer a clear 4xx with one line, and nothing changed in the store.

Oversized and deeply nested bodies, path traversal in every name-like path parameter, CR/LF meant for
headers, SQL-ish strings, unicode confusables, right-to-left and other non-ASCII names. The store is
compared before and after (the audit log aside: it records every refused change, as it must).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from kasou.api.limits import BODY_MAX, DEPTH_MAX
from kasou.api.spec import CHECKED_IN
from tests.functional.conftest import Env

# Path segments as sent (already percent-encoded where that is the point). A bare ".." is left out: the client
# resolves it before sending (as a browser does), so the server sees another path.
HOSTILE_SEGMENTS = [
    "%2e%2e",
    "%2E%2E%2Fetc%2Fpasswd",
    "..%2f..%2fkasou-escape",
    "..%5c..%5ckasou-escape",
    "vm1%00",
    "%00",
    "vm1%2Fdisk0",
    "vm1%0d%0aX-Injected:%201",
    "vm1%0aSet-Cookie:%20kasou_session=x",
    "'%20OR%20'1'='1",
    "vm1';DROP%20TABLE%20kv;--",
    "%EF%BD%96%EF%BD%8D%EF%BC%91",  # "vm1" in fullwidth letters
    "vm%D1%96",  # "vmi" with a Cyrillic i
    "%E2%80%AEvm1",  # right-to-left override
    "%E9%9B%BB%E5%AD%90%E3%82%AB%E3%83%AB%E3%83%86",  # 電子カルテ
    "a" * 300,
]
# The same as names inside bodies (decoded).
HOSTILE_NAMES = [
    "..",
    "../../kasou-escape",
    "..\\..\\kasou-escape",
    "vm1\x00",
    "vm1/disk0",
    "vm1\r\nX-Injected: 1",
    "vm1\nSet-Cookie: kasou_session=x",
    "' OR '1'='1",
    "vm1';DROP TABLE kv;--",
    "\uff56\uff4d\uff11",  # "vm1" in fullwidth letters
    "vm\u0456",  # a Cyrillic i
    "\u202evm1",
    "vm1\u200b",  # zero-width space
    "電子カルテ",
    "a" * 300,
    "",
    " vm1",
]
# A valid value for each path parameter, while another one is the hostile one.
VALID = {"name": "vm1", "snapshot": "s1", "generation": "1", "pool": "p1", "user": "u1", "job_id": "j1",
         "disk_id": "disk0", "nic_id": "net0", "action": "start", "token_id": "t1", "department": "lab",
         "window": "mw-0000000000", "group": "kasou-ops",
         "rec_id": "0" * 32}  # fmt: skip
# Bodies that are right in themselves, so a refusal is about the path.
BODIES: dict[tuple[str, str], Any] = {
    ("patch", "/v1/vms/{name}"): {"description": "x"},
    ("post", "/v1/vms/{name}/snapshots"): {"name": "s2"},
    ("post", "/v1/vms/{name}/disks/{disk_id}/rebuild"): {"pool": "p1"},
    ("post", "/v1/vms/{name}/disks/{disk_id}/resize"): {"size": "2G"},
    ("post", "/v1/vms/{name}/disks"): {"size": "1G"},
    ("post", "/v1/vms/{name}/nics"): {"network": "user"},
    ("post", "/v1/vms/{name}/backups/{generation}/restore"): {"as": "vm9"},
    ("patch", "/v1/vms/{name}/backup-policy"): {"keep": 3},
    ("patch", "/v1/departments/{department}/backup-policy"): {"keep": 3},
    ("patch", "/v1/desktop-pools/{pool}"): {"size": 2},
    ("post", "/v1/users/{user}/password"): {"password": "a long password 1"},
    ("put", "/v1/users/{user}/pools"): {"pools": ["p1"]},
    ("put", "/v1/users/{user}/departments"): {"departments": ["lab"]},
    ("post", "/v1/users/{user}/tokens"): {"name": "t"},
}
FIXED_QUERY = {"/v1/jobs/{job_id}/events": {"timeout": "0.05"}}
# Creations whose name (or another name field) takes each hostile name.
CREATES: list[tuple[str, str, dict[str, Any]]] = [
    ("/v1/vms", "name", {"image": "tiny", "vcpus": 1, "memory_mib": 128}),
    ("/v1/vms", "image", {"name": "vm2", "vcpus": 1, "memory_mib": 128}),
    ("/v1/vms", "network", {"name": "vm2", "image": "tiny"}),
    ("/v1/vms", "pool", {"name": "vm2", "image": "tiny"}),
    ("/v1/vms", "anti_affinity", {"name": "vm2", "image": "tiny"}),
    ("/v1/networks", "name", {}),
    ("/v1/users", "name", {"role": "operator", "password": "a long password 1"}),
    ("/v1/vms/vm1/snapshots", "name", {}),
    ("/v1/desktop-pools", "name", {"template": "t1", "size": 1}),
    ("/v1/maintenance-windows", "vendor", {"vms": ["vm1"], "starts_at": 0, "ends_at": 3600, "plan": "p"}),
]


def state(env: Env) -> dict[str, Any]:
    """Everything in the store but the audit log (which records every refused change)."""
    entries = env.api.portal.call(env.services.store.range, "")
    return {e.key: e.value for e in entries if not e.key.startswith("audit")}


def files(env: Env) -> set[str]:
    """Files in the home but the store's own and the audit log's signing key and anchor file (made at its first
    checkpoint)."""
    skip = ("state.db", "audit.key", "audit-anchors.jsonl")
    return {str(p.relative_to(env.tmp)) for p in env.tmp.rglob("*") if not p.name.startswith(skip)}


def assert_clear_refusal(r: Any, what: str) -> None:
    assert 400 <= r.status_code < 500, (what, r.status_code, r.text[:300])
    body = r.json()
    assert set(body) >= {"code", "message"}, (what, body)
    msg = body["message"]
    assert msg and "\n" not in msg and "\r" not in msg and len(msg) < 600, (what, msg)
    assert "x-injected" not in {k.lower() for k in r.headers}, (what, r.headers)
    assert "set-cookie" not in {k.lower() for k in r.headers}, (what, r.headers)
    assert "Traceback" not in r.text and body["code"] != "internal", (what, r.text)


@pytest.fixture
def seeded(env: Env) -> Env:
    env.create("vm1")
    return env


def _operations() -> list[tuple[str, str, list[str]]]:
    doc = json.loads(CHECKED_IN.read_text())
    out = []
    for path, methods in doc["paths"].items():
        params = re.findall(r"{(\w+)}", path)
        for method in methods:
            if params:
                out.append((method, path, params))
    return out


def test_path_traversal_and_strange_names_in_every_path_parameter(seeded: Env) -> None:
    env = seeded
    before, before_files = state(env), files(env)
    ops = _operations()
    assert len(ops) > 30 and {p for _, _, ps in ops for p in ps} <= set(VALID), ops
    sent = 0
    for method, path, params in ops:
        for hostile in params:
            for seg in HOSTILE_SEGMENTS:
                url = path
                for p in params:
                    url = url.replace("{" + p + "}", seg if p == hostile else VALID[p])
                body = BODIES.get((method, path))
                kw: dict[str, Any] = {"params": FIXED_QUERY.get(path)}
                if body is not None:
                    kw["json"] = body
                r = env.api.request(method.upper(), url, **kw)
                sent += 1
                assert_clear_refusal(r, f"{method.upper()} {url}")
    assert state(env) == before
    assert files(env) == before_files
    for escape in (env.tmp.parent / "kasou-escape", Path("/tmp/kasou-escape")):
        assert not escape.exists()
    assert sent > 500


def test_hostile_names_in_bodies_change_nothing(seeded: Env) -> None:
    env = seeded
    before, before_files = state(env), files(env)
    for path, field, rest in CREATES:
        for name in HOSTILE_NAMES:
            r = env.api.post(path, json={**rest, field: name})
            assert_clear_refusal(r, f"POST {path} {field}={name!r}")
            assert r.status_code == 422, (path, field, name, r.text)
    for patch in ({"description": "x" * 501}, {"priority": "1; DROP TABLE kv"}, {"ha": "yes"}, {"name": "vm2"}):
        assert_clear_refusal(env.api.patch("/v1/vms/vm1", json=patch), f"PATCH {patch}")
    # SQL-ish filters on reads find nothing, and break nothing.
    for q in ("' OR '1'='1", "vm1'; DROP TABLE kv; --", "%", "*"):
        r = env.api.get("/v1/events", params={"subject": q})
        assert r.status_code == 200 and r.json() == [], r.text
        r = env.api.get("/v1/audit/records", params={"actor": q})
        assert r.status_code == 200 and r.json() == [], r.text
        assert_clear_refusal(env.api.get("/v1/jobs", params={"vm": q}), f"jobs vm={q!r}")
    assert state(env) == before
    assert files(env) == before_files
    assert env.api.get("/v1/vms").json()[0]["name"] == "vm1"


def test_sql_ish_text_is_kept_as_text(seeded: Env) -> None:
    """Free text (a description) is data: stored and given back as it was, the store intact."""
    env = seeded
    text = "'); DROP TABLE kv; -- \" OR 1=1 /* 電子カルテ */"
    r = env.api.patch("/v1/vms/vm1", json={"description": text})
    assert r.status_code == 200, r.text
    assert env.api.get("/v1/vms/vm1").json()["description"] == text
    assert [v["name"] for v in env.api.get("/v1/vms").json()] == ["vm1"]


def test_oversized_bodies_are_413_and_change_nothing(seeded: Env) -> None:
    env = seeded
    before = state(env)
    big = json.dumps({"name": "vm2", "image": "tiny", "description": "x" * (BODY_MAX + 1)}).encode()
    for path in ("/v1/vms", "/v1/networks", "/v1/users", "/v1/vms/vm1/snapshots"):
        r = env.api.post(path, content=big, headers={"content-type": "application/json"})
        assert r.status_code == 413, r.text
        assert r.json()["code"] == "too_large"
        assert_clear_refusal(r, path)
    # Without a Content-Length (chunked), counted as it arrives.
    r = env.api.post("/v1/vms", content=iter([b" " * 65536] * 20), headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["code"] == "too_large", r.text
    r = env.api.patch("/v1/vms/vm1", content=iter([b"x" * 65536] * 20), headers={"content-type": "text/plain"})
    assert r.status_code == 413, r.text
    # Just under the bound is read, and refused for what it says.
    near = json.dumps({"name": "vm2", "image": "tiny", "description": "x" * (BODY_MAX - 100)}).encode()
    assert len(near) <= BODY_MAX
    r = env.api.post("/v1/vms", content=near, headers={"content-type": "application/json"})
    assert r.status_code == 422 and "description" in r.json()["message"], r.text
    assert state(env) == before
    # A refused change is still audited.
    records = env.api.get("/v1/audit/records", params={"action": "POST /v1/vms"}).json()
    assert any(rec["result"]["status"] == 413 for rec in records)


@pytest.mark.parametrize("depth", [DEPTH_MAX + 1, 1000, 100_000])
def test_deeply_nested_json_is_a_clear_422(seeded: Env, depth: int) -> None:
    env = seeded
    before = state(env)
    for body in ("[" * depth + "]" * depth, '{"a":' * depth + "1" + "}" * depth, '{"name": ' + "[" * depth):
        for method, path in (("POST", "/v1/vms"), ("PATCH", "/v1/vms/vm1"), ("POST", "/v1/users")):
            r = env.api.request(method, path, content=body.encode(), headers={"content-type": "application/json"})
            assert r.status_code == 422, (path, depth, r.text[:200])
            assert_clear_refusal(r, f"{method} {path} depth {depth}")
            assert "nested" in r.json()["message"]
    # Without a content type FastAPI reads JSON all the same: bounded too.
    r = env.api.post("/v1/vms", content=("[" * depth).encode())
    assert r.status_code == 422 and "nested" in r.json()["message"], r.text
    assert state(env) == before


def test_nesting_within_the_bound_and_brackets_in_strings_are_fine(seeded: Env) -> None:
    env = seeded
    desc = "[[[[{{{{" * 20 + '\\"]]]'  # brackets and an escaped quote in a string do not nest
    r = env.api.patch("/v1/vms/vm1", json={"description": desc})
    assert r.status_code == 200, r.text
    r = env.api.post("/v1/vms", json={"name": "vm2", "image": "tiny", "mirror": [[["p1"]]]})
    assert r.status_code == 422 and "nested" not in r.json()["message"], r.text


def test_malformed_bodies_are_one_line_4xx(seeded: Env) -> None:
    env = seeded
    before = state(env)
    for content, ctype in (
        (b"\xff\xfe\x00{", "application/json"),
        (b'{"name": "vm2",', "application/json"),
        (b"name=vm2", "application/x-www-form-urlencoded"),
        (b"\x00" * 100, "application/octet-stream"),
        (b'{"name": "vm2", "name": "vm3", "image": "tiny", "vcpus": 1e999}', "application/json"),
        (b'{"name": "vm2", "image": "tiny", "vcpus": NaN}', "application/json"),
    ):
        r = env.api.post("/v1/vms", content=content, headers={"content-type": ctype})
        assert_clear_refusal(r, f"{ctype} {content[:20]!r}")
    assert state(env) == before


def test_web_pages_refuse_traversal_and_nul(env: Env) -> None:
    """The static pages (not in the OpenAPI document): nothing outside their folders, a NUL is a 404, not a 500."""
    for path in ("/ui/a%00b", "/ui/novnc/a%00b", "/ui/%00", "/ui/%2e%2e/%2e%2e/etc/passwd", "/ui/..%2f..%2fetc%2fpasswd",
                 "/ui/novnc/%2e%2e/%2e%2e/%2e%2e/etc/passwd", "/ui/%2e%2e/api/openapi.json", "/ui/" + "a" * 5000,
                 "/ui/index.html%0d%0aX-Injected:%201", "/ui/%ff%fe"):  # fmt: skip
        r = env.api.get(path)
        assert r.status_code == 404, (path, r.status_code, r.text[:200])
        assert_clear_refusal(r, path)
    assert env.api.get("/ui/index.html").status_code == 200
