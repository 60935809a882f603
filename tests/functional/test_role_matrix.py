"""The role matrix: every route of the API against every role, from the one permission table.

The routes are enumerated from the app itself, so a route added without a stated permission fails
here (and is refused to everyone at run time: kasou.api.permissions fails closed).
"""

from __future__ import annotations

import time
from typing import Any

import pytest
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient
from starlette.routing import Mount, Route, WebSocketRoute

from kasou.api.permissions import PUBLIC, PUBLIC_PAGES, ROUTES, SIGNED_IN, need_of
from kasou.model.users import PERMISSIONS, Role
from tests.functional.conftest import Env

PW = "correct horse battery"
STREAMS = {"/v1/events/stream", "/v1/jobs/{job_id}/events"}  # not opened when allowed (they stay open)
CSRF = {"x-kasou-csrf": "1"}


def app_routes(app: Any) -> list[tuple[str, str]]:
    """Every (method, path template) the app serves; "WS" for websockets, "PAGE" for non-API pages."""
    out: list[tuple[str, str]] = []

    def walk(routes: list[Any], prefix: str) -> None:
        for r in routes:
            if hasattr(r, "original_router") and hasattr(r, "include_context"):  # an included router
                walk(r.original_router.routes, prefix + r.include_context.prefix)
            elif isinstance(r, WebSocketRoute) or type(r).__name__ == "APIWebSocketRoute":
                out.append(("WS", prefix + r.path))
            elif isinstance(r, Mount):
                out.append(("PAGE", prefix + r.path))
            elif isinstance(r, APIRoute):  # also kasou.api.watches.WatchRoute
                out.extend((m, prefix + r.path) for m in sorted(r.methods - {"HEAD"}))
            elif isinstance(r, Route):
                out.append(("PAGE", prefix + r.path))
            else:
                raise AssertionError(f"a route of an unknown kind: {r!r}")

    walk(app.routes, "")
    return out


def test_every_route_states_its_permission(env: Env) -> None:
    routes = app_routes(env.api.app)
    assert len(routes) > 60
    api = [(m, p) for m, p in routes if m != "PAGE"]
    missing = [f"{m} {p}" for m, p in api if need_of(m, p) is None]
    assert missing == [], "routes with no permission in kasou.api.permissions"
    pages = {p for m, p in routes if m == "PAGE"}
    assert pages <= PUBLIC_PAGES, pages - PUBLIC_PAGES
    stale = [f"{m} {p}" for m, p in ROUTES if (m, p) not in api]
    assert stale == [], "permissions stated for routes that do not exist"
    # The OpenAPI document agrees: each documented operation is in the table.
    doc = env.api.get("/openapi.json").json()
    for path, ops in doc["paths"].items():
        for method in ops:
            assert need_of(method.upper(), path) is not None, (method, path)


def _fill(path: str, vm: str, job: str) -> str:
    values = {"name": vm, "job_id": job, "user": "nobody", "pool": "nopool", "snapshot": "s1", "generation": "1",
              "disk_id": "d0", "nic_id": "net9", "action": "start", "department": "lab",
              "window": "mw-0000000000", "group": "nogroup", "rec_id": "0" * 32}  # fmt: skip
    for k, v in values.items():
        path = path.replace("{" + k + "}", v)
    assert "{" not in path, path
    return path


def open_window(env: Env, c: TestClient, vendor: str, vms: list[str]) -> str:
    """An hour's window of ``vendor`` (signed in as ``c``) on ``vms`` with every permission, approved by root."""
    now = time.time()
    body = {"vendor": vendor, "vms": vms, "starts_at": now, "ends_at": now + 3600, "plan": "the role matrix"}
    r = c.post("/v1/maintenance-windows", json=body, headers=CSRF)
    assert r.status_code == 201, r.text
    assert env.api.post(f"/v1/maintenance-windows/{r.json()['id']}/approve").status_code == 200
    return str(r.json()["id"])


def _order(route: tuple[str, str]) -> tuple[int, str, str]:
    m, p = route
    last = p == "/v1/auth/logout" or m == "DELETE"  # they end the session or remove the VM
    return (2 if p == "/v1/auth/logout" else 1 if last else 0, p, m)


def _call(c: TestClient, method: str, path: str) -> Any:
    if method == "GET":
        return c.get(path)
    return c.request(method, path, json={}, headers=CSRF)


@pytest.mark.parametrize("role", [r.value for r in Role])
def test_each_role_against_each_route(env: Env, role: str) -> None:
    mine = env.create("mine", department="lab")
    env.create("theirs", department="pacs")
    job = env.api.get("/v1/jobs", params={"vm": "mine"}).json()[0]["id"]
    scoped = role in ("vendor", "manager")  # department-scoped roles
    extra: dict[str, Any] = {"departments": ["lab"]} if scoped else {}
    r = env.api.post("/v1/users", json={"name": "u", "role": role, "password": PW, **extra})
    assert r.status_code == 201, r.text
    c = env.client(base_url="http://testserver")
    assert c.post("/v1/auth/login", json={"name": "u", "password": PW}).status_code == 200
    anon = env.client(base_url="http://testserver")
    if role == "vendor":  # a vendor acts only inside a window (outside one: test_window_matrix.py)
        open_window(env, c, "u", ["mine"])
    held = PERMISSIONS[Role(role)]
    checked = 0
    for method, template in sorted((k for k in ROUTES if k[0] != "WS"), key=_order):
        need = ROUTES[(method, template)]
        if PUBLIC in need.anyof:
            continue
        path = _fill(template, mine["name"], job)
        if template not in STREAMS or method != "GET":
            assert _call(anon, method, path).status_code == 401, f"{method} {template} without signing in"
        allowed = SIGNED_IN in need.anyof or any(x in held for x in need.anyof)
        scoped_out = scoped and not (need.vm or need.job or need.lists) and SIGNED_IN not in need.anyof
        if template.endswith("/console-ticket") and "console" not in held:
            allowed = False  # "portal": the route lets a clinician open their own desktop's console only
        if not allowed or scoped_out:
            r = _call(c, method, path)
            assert r.status_code == 403, f"{role}: {method} {template} -> {r.status_code} {r.text[:200]}"
        else:
            if template not in STREAMS:
                r = _call(c, method, path)
                assert r.status_code not in (401, 403), f"{role}: {method} {template} -> {r.status_code} {r.text}"
            if scoped and need.vm:  # another department's VM does not exist for them
                r = _call(c, method, _fill(template, "theirs", job))
                assert r.status_code == 404 and r.json()["message"] == "no VM named 'theirs'", (template, r.text)
        checked += 1
    assert checked > 50


def _signed_in(env: Env, name: str) -> TestClient:
    """A browser signed in as ``name``, whose requests run on the app's own event loop (so the jobs
    they start go on after the request, as in a server)."""
    c = env.client(base_url="http://testserver")
    c.portal = env.api.portal
    assert c.post("/v1/auth/login", json={"name": name, "password": PW}).status_code == 200
    return c


def test_a_vendor_sees_and_makes_only_their_departments_vms(env: Env) -> None:
    env.create("lab1", department="lab")
    env.create("pacs1", department="pacs")
    env.create("untagged")
    r = env.api.post("/v1/users", json={"name": "v", "role": "vendor", "password": PW, "departments": ["lab"]})
    assert r.status_code == 201, r.text
    v = _signed_in(env, "v")
    open_window(env, v, "v", ["lab1"])
    assert [x["name"] for x in v.get("/v1/vms").json()] == ["lab1"]
    assert {j["vm"] for j in v.get("/v1/jobs").json()} == {"lab1"}
    assert [x["name"] for x in v.get("/v1/reports/uptime").json()] == ["lab1"]
    for path in ("/v1/hosts", "/v1/networks", "/v1/pools", "/v1/events", "/v1/audit/records", "/metrics"):
        assert v.get(path).status_code == 403, path
    assert v.post("/v1/hosts/host1/maintenance", headers=CSRF).status_code == 403
    assert v.post("/v1/vms/lab1/migrate", json={}, headers=CSRF).status_code == 403
    # Created VMs take the vendor's only department; another department is refused, nothing made.
    r = v.post("/v1/vms", json={"name": "lab2", "image": "tiny"}, headers=CSRF)
    assert r.status_code == 202, r.text
    done = env.wait(r.json()["job"])
    assert done["state"] == "succeeded", done["error"]
    assert env.api.get("/v1/vms/lab2").json()["department"] == "lab"
    r = v.post("/v1/vms", json={"name": "x", "image": "tiny", "department": "pacs"}, headers=CSRF)
    assert r.status_code == 403 and "their departments only" in r.json()["message"]
    assert env.api.get("/v1/vms/x").status_code == 404
    # Their VM: full control, console included; another's: nothing, not even its existence.
    assert v.post("/v1/vms/lab1/actions/start", headers=CSRF).status_code == 202
    for path in ("/v1/vms/pacs1", "/v1/vms/untagged", "/v1/vms/nonexistent"):
        r = v.get(path)
        assert r.status_code == 404 and r.json()["message"].startswith("no VM named"), path
    assert v.post("/v1/vms/pacs1/console-ticket", headers=CSRF).status_code == 404
    assert v.delete("/v1/vms/pacs1", headers=CSRF).status_code == 404
    assert env.api.get("/v1/vms/pacs1").json()["state"] == "stopped"
    # An administrator moves a VM to the lab: the vendor knows it from then on, and acts on it inside a window.
    assert env.api.patch("/v1/vms/untagged", json={"department": "lab"}).status_code == 200
    r = v.get("/v1/vms/untagged")
    assert r.status_code == 403 and "maintenance window" in r.json()["message"], r.text
    open_window(env, v, "v", ["untagged"])
    assert v.get("/v1/vms/untagged").status_code == 200


@pytest.mark.parametrize(
    ("body", "words"),
    [
        ({"role": "vendor"}, "at least one department"),
        ({"role": "operator", "departments": ["lab"]}, "only a vendor"),
        ({"role": "vendor", "departments": ["../lab"]}, "must not contain"),
        ({"role": "vendor", "departments": ["lab", "lab"]}, "twice"),
    ],
)
def test_bad_departments_are_refused(env: Env, body: dict, words: str) -> None:
    r = env.api.post("/v1/users", json={"name": "v", "password": PW, **body})
    assert r.status_code == 422 and words in r.json()["message"], r.text
    assert env.api.get("/v1/users").json() == []
