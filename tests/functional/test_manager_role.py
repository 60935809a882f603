"""The department manager role: a vendor's window is requested by the department (or the vendor) and confirmed by
the department's manager (MHLW guideline: access rights follow the department's request confirmed by its manager).
A manager sees, approves, denies and revokes the windows of their departments only, never one they requested or
are the vendor of; administrators keep approving everything."""

from __future__ import annotations

import pytest

from tests.functional.conftest import Env
from tests.functional.test_maintenance_windows import CSRF, Clock, request, signed_in


@pytest.fixture
def clock(env: Env) -> Clock:
    c = Clock()
    env.services.windows.clock = c
    return c


def test_a_manager_approves_the_windows_of_their_department(env: Env, clock: Clock) -> None:
    env.create("lab1", department="lab")
    env.create("lab2", department="lab")
    env.create("pacs1", department="pacs")
    v = signed_in(env, "v", "vendor", ["lab", "pacs"])
    m = signed_in(env, "m", "manager", ["lab"])
    mp = signed_in(env, "mp", "manager", ["pacs"])
    w = request(v, clock, ["lab1"]).json()
    # The pacs manager does not even see it; the lab manager approves it and the vendor is in.
    assert mp.get(f"/v1/maintenance-windows/{w['id']}").status_code == 404
    assert mp.get("/v1/maintenance-windows").json() == []
    assert mp.post(f"/v1/maintenance-windows/{w['id']}/approve", headers=CSRF).status_code == 404
    assert [x["id"] for x in m.get("/v1/maintenance-windows").json()] == [w["id"]]
    r = m.post(f"/v1/maintenance-windows/{w['id']}/approve", headers=CSRF)
    assert r.status_code == 200 and (r.json()["state"], r.json()["decided_by"]) == ("approved", "m"), r.text
    assert r.json()["vm_departments"] == {"lab1": "lab"}
    assert v.get("/v1/vms/lab1").status_code == 200
    assert m.get(f"/v1/maintenance-windows/{w['id']}/report").status_code == 200
    # It revokes it: the vendor's access ends.
    assert m.post(f"/v1/maintenance-windows/{w['id']}/revoke", headers=CSRF).json()["state"] == "revoked"
    assert v.get("/v1/vms/lab1").status_code == 403
    # A window naming VMs of two departments: each manager sees it, neither decides alone; an administrator does.
    w2 = request(v, clock, ["lab2", "pacs1"]).json()
    for c in (m, mp):
        assert c.get(f"/v1/maintenance-windows/{w2['id']}").status_code == 200
        for verb in ("approve", "deny", "revoke"):
            r = c.post(f"/v1/maintenance-windows/{w2['id']}/{verb}", headers=CSRF)
            assert r.status_code == 403 and "does not manage" in r.json()["message"], r.text
    assert env.api.get(f"/v1/maintenance-windows/{w2['id']}").json()["state"] == "requested"
    assert env.api.post(f"/v1/maintenance-windows/{w2['id']}/approve").json()["state"] == "approved"
    # Denying: the lab manager denies a lab window.
    w3 = request(v, clock, ["lab2"]).json()
    assert m.post(f"/v1/maintenance-windows/{w3['id']}/deny", headers=CSRF).json()["state"] == "denied"


def test_a_manager_requests_for_their_vendor_and_never_approves_it_themselves(env: Env, clock: Clock) -> None:
    env.create("lab1", department="lab")
    env.create("pacs1", department="pacs")
    signed_in(env, "v", "vendor", ["lab"])
    signed_in(env, "vp", "vendor", ["pacs"])
    m = signed_in(env, "m", "manager", ["lab"])
    m2 = signed_in(env, "m2", "manager", ["lab"])
    w = request(m, clock, ["lab1"]).json()
    assert (w["state"], w["requested_by"]) == ("requested", "m")
    r = m.post(f"/v1/maintenance-windows/{w['id']}/approve", headers=CSRF)
    assert r.status_code == 403 and "may not approve it" in r.json()["message"], r.text
    r = m.post(f"/v1/maintenance-windows/{w['id']}/deny", headers=CSRF)
    assert r.status_code == 403 and "may not deny it" in r.json()["message"], r.text
    assert m2.post(f"/v1/maintenance-windows/{w['id']}/approve", headers=CSRF).json()["state"] == "approved"
    # Not for a vendor of another department, not for a VM of another department, which does not exist for them.
    r = request(m, clock, ["pacs1"], vendor="vp")
    assert r.status_code == 422 and "in your departments" in r.json()["message"], r.text
    r = request(m, clock, ["pacs1"])
    assert r.status_code == 404 and r.json()["message"] == "no VM named 'pacs1'", r.text
    # A manager changes no VM and opens no console.
    assert m.post("/v1/vms/lab1/actions/start", headers=CSRF).status_code == 403
    assert m.post("/v1/vms/lab1/console-ticket", headers=CSRF).status_code == 403
    assert m.get("/v1/vms/pacs1").status_code == 404
    assert m.get("/v1/hosts").status_code == 403 and m.get("/v1/audit/records").status_code == 403


def test_an_operator_may_not_approve_and_a_manager_needs_a_department(env: Env, clock: Clock) -> None:
    env.create("lab1", department="lab")
    signed_in(env, "v", "vendor", ["lab"])
    op = signed_in(env, "op", "operator")
    w = request(op, clock, ["lab1"]).json()
    assert op.post(f"/v1/maintenance-windows/{w['id']}/approve", headers=CSRF).status_code == 403
    r = env.api.post("/v1/users", json={"name": "m", "role": "manager", "password": "correct horse battery"})
    assert r.status_code == 422 and "at least one department" in r.json()["message"], r.text


def test_cli_user_create_manager(env: Env) -> None:
    from typer.testing import CliRunner

    from kasou.api.client import Client
    from kasou.cli import common
    from kasou.cli import main as cli
    from tests.functional.conftest import TOKEN

    common.client_factory = lambda: Client("http://testserver", TOKEN, http=env.api)
    try:
        r = CliRunner().invoke(cli.app, ["user", "create", "chief", "--role", "manager", "--department", "lab",
                                         "--password-stdin"], input="correct horse battery\n")  # fmt: skip
        assert r.exit_code == 0, r.output
        assert "created (manager)" in r.output
        u = next(x for x in env.api.get("/v1/users").json() if x["name"] == "chief")
        assert (u["role"], u["departments"]) == ("manager", ["lab"])
    finally:
        common.client_factory = None
