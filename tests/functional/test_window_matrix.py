"""The vendor's window matrix: every VM- or job-scoped route of the API (enumerated from the one permission table,
which test_role_matrix.py proves complete against the app's routes) against a vendor outside a window, inside a
window naming the VM with each single permission, and inside a window naming another VM of their department."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi.testclient import TestClient

from kasou.api.permissions import ROUTES, Need
from kasou.model.maintenance import GRANTABLE
from tests.functional.conftest import Env
from tests.functional.test_maintenance_windows import Clock, opened, signed_in
from tests.functional.test_role_matrix import STREAMS, _call, _fill, _order

SCOPED = sorted(((m, p) for (m, p), n in ROUTES.items() if m != "WS" and (n.vm or n.job)), key=_order)


@pytest.fixture
def clock(env: Env) -> Clock:
    c = Clock()
    env.services.windows.clock = c
    return c


def _setup(env: Env) -> tuple[TestClient, dict[str, Any], str]:
    mine = env.create("mine", department="lab")
    env.create("sibling", department="lab")
    job = env.api.get("/v1/jobs", params={"vm": "mine"}).json()[0]["id"]
    return signed_in(env, "v", "vendor", ["lab"]), mine, job


def _refused_by_window(r: Any, what: str) -> None:
    assert r.status_code == 403, f"{what} -> {r.status_code} {r.text[:200]}"
    assert "maintenance window" in r.json()["message"], f"{what}: {r.text[:200]}"


def test_a_vendor_outside_a_window_is_refused_on_every_vm_scoped_route(env: Env, clock: Clock) -> None:
    v, mine, job = _setup(env)
    assert len(SCOPED) > 30
    for method, template in SCOPED:
        if template in STREAMS and method == "GET":
            continue  # stays open when allowed; its refusal is checked below with the job route
        _refused_by_window(_call(v, method, _fill(template, mine["name"], job)), f"{method} {template}")
    _refused_by_window(v.get(f"/v1/jobs/{job}/events", params={"timeout": 0.05}), "job events")
    # Lists show nothing; creating and importing are refused; their windows stay theirs to see and request.
    for path in ("/v1/vms", "/v1/jobs", "/v1/reports/uptime"):
        assert v.get(path).json() == [], path
    for path, body in (
        ("/v1/vms", {"name": "x", "image": "tiny"}),
        ("/v1/imports", {"name": "x", "disks": ["a.qcow2"]}),
    ):
        _refused_by_window(v.post(path, json=body, headers={"x-kasou-csrf": "1"}), path)
    assert v.get("/v1/maintenance-windows").status_code == 200
    # Nothing was changed by any of it.
    assert env.api.get("/v1/vms/mine").json()["state"] == "stopped"
    assert env.api.get("/v1/vms/sibling").status_code == 200


def _allowed(need: Need, granted: set[str]) -> bool:
    return any(x in granted for x in need.anyof if x in GRANTABLE)


@pytest.mark.parametrize("granted", [sorted(GRANTABLE), *([p] for p in sorted(GRANTABLE))])
def test_inside_a_window_exactly_its_vms_and_permissions(env: Env, clock: Clock, granted: list[str]) -> None:
    v, mine, job = _setup(env)
    w = opened(env, v, clock, ["mine"], permissions=granted)
    checked = 0
    for method, template in SCOPED:
        need = ROUTES[(method, template)]
        if template in STREAMS and method == "GET":
            continue
        what = f"{granted} {method} {template}"
        # Another VM of their department, not in the window: refused whatever the route needs.
        if need.vm:
            _refused_by_window(_call(v, method, _fill(template, "sibling", job)), what + " (sibling)")
        allowed = _allowed(need, set(granted))
        if allowed and (method, template) == ("DELETE", "/v1/vms/{name}"):
            continue  # it would end the VM the rest of the matrix works on (allowed: test_role_matrix.py)
        r = _call(v, method, _fill(template, mine["name"], job))
        if allowed:
            assert r.status_code not in (401, 403), f"{what} -> {r.status_code} {r.text[:200]}"
        else:
            assert r.status_code == 403, f"{what} -> {r.status_code} {r.text[:200]}"
        checked += 1
    assert checked >= len(SCOPED) - 2  # all but the job stream and, when allowed, the VM delete
    # Every change the vendor made carries the window's id in the audit log.
    recs = env.api.get("/v1/audit/records", params={"actor": "v"}).json()
    vm_recs = [x for x in recs if x["target"] in ("vms/mine", f"jobs/{job}") and x["action"] != "login"]
    assert vm_recs and all(x["details"].get("window") == w["id"] for x in vm_recs if x["result"]["ok"]), vm_recs
    # At the window's end, all of it is refused again.
    clock.now = w["ends_at"] + 1
    for method, template in SCOPED[:10]:
        if template not in STREAMS:
            _refused_by_window(_call(v, method, _fill(template, mine["name"], job)), f"after: {method} {template}")


def test_a_manager_on_every_vm_scoped_route_reads_their_departments_vms_without_a_window(
    env: Env, clock: Clock
) -> None:
    """A manager is scoped to their departments like a vendor, but reads without a window and changes nothing."""
    mine = env.create("mine", department="lab")
    env.create("theirs", department="pacs")
    job = env.api.get("/v1/jobs", params={"vm": "mine"}).json()[0]["id"]
    m = signed_in(env, "m", "manager", ["lab"])
    for method, template in SCOPED:
        need = ROUTES[(method, template)]
        if template in STREAMS and method == "GET":
            continue
        what = f"manager {method} {template}"
        r = _call(m, method, _fill(template, mine["name"], job))
        if "vm.read" in need.anyof:
            assert r.status_code not in (401, 403), f"{what} -> {r.status_code} {r.text[:200]}"
        else:
            assert r.status_code == 403 and "maintenance window" not in r.json()["message"], f"{what}: {r.text[:200]}"
        if need.vm:
            r = _call(m, method, _fill(template, "theirs", job))
            assert r.status_code in (403, 404), f"{what} (theirs) -> {r.status_code}"
            if "vm.read" in need.anyof:
                assert r.status_code == 404 and r.json()["message"] == "no VM named 'theirs'", what
    assert [v["name"] for v in m.get("/v1/vms").json()] == ["mine"]
    assert {j["vm"] for j in m.get("/v1/jobs").json()} == {"mine"}
