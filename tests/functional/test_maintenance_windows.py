"""Vendors' maintenance windows end to end (API and CLI, fake driver, a fake clock): request, approve, deny,
revoke, expire; the requester never approves; bad input changes nothing; a vendor acts only inside an active
window, on exactly its VMs with exactly its permissions; what they did is tied to the window in the audit log
and listed against the plan in the window's report."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from kasou.control import users as users_mod
from tests.cli_errors import error_of
from tests.functional.conftest import Env

PW = "correct horse battery"
CSRF = {"x-kasou-csrf": "1"}
HOUR = 3600.0


class Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(env: Env, monkeypatch: pytest.MonkeyPatch) -> Iterator[Clock]:
    from argon2 import PasswordHasher

    monkeypatch.setattr(users_mod, "_hasher", PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1))
    c = Clock()
    env.services.windows.clock = c
    yield c


def signed_in(env: Env, name: str, role: str, departments: list[str] | None = None) -> TestClient:
    body: dict[str, Any] = {"name": name, "role": role, "password": PW}
    if departments:
        body["departments"] = departments
    assert env.api.post("/v1/users", json=body).status_code == 201
    c = env.client(base_url="http://testserver")
    c.portal = env.api.portal
    assert c.post("/v1/auth/login", json={"name": name, "password": PW}).status_code == 200
    return c


def request(c: TestClient, clock: Clock, vms: list[str], start: float = 0, length: float = HOUR, **kw: Any) -> Any:
    body = {"vendor": "v", "vms": vms, "starts_at": clock.now + start, "ends_at": clock.now + start + length,
            "plan": "replace the lab DB's index", **kw}  # fmt: skip
    return c.post("/v1/maintenance-windows", json=body, headers=CSRF)


def opened(env: Env, v: TestClient, clock: Clock, vms: list[str], **kw: Any) -> dict[str, Any]:
    """A window the vendor requested and root approved, active now."""
    r = request(v, clock, vms, **kw)
    assert r.status_code == 201, r.text
    r = env.api.post(f"/v1/maintenance-windows/{r.json()['id']}/approve")
    assert r.status_code == 200 and r.json()["active"], r.text
    return dict(r.json())


def test_a_vendor_acts_only_inside_an_approved_active_window(env: Env, clock: Clock) -> None:
    env.create("lab1", department="lab")
    env.create("lab2", department="lab")
    env.create("pacs1", department="pacs")
    v = signed_in(env, "v", "vendor", ["lab"])
    # Outside any window: signed in, sees their (no) windows, and nothing of their VMs.
    assert v.get("/v1/auth/me").status_code == 200
    assert v.get("/v1/maintenance-windows").json() == []
    assert v.get("/v1/vms").json() == [] and v.get("/v1/jobs").json() == []
    r = v.get("/v1/vms/lab1")
    assert r.status_code == 403 and "maintenance window" in r.json()["message"] and "\n" not in r.json()["message"]
    assert v.post("/v1/vms/lab1/actions/start", headers=CSRF).status_code == 403
    assert v.get("/v1/vms/pacs1").status_code == 404  # another department's: as if it did not exist
    r = v.post("/v1/vms", json={"name": "lab3", "image": "tiny"}, headers=CSRF)
    assert r.status_code == 403 and "maintenance window" in r.json()["message"], r.text
    # The vendor requests a window starting in an hour; root approves it.
    r = request(v, clock, ["lab1"], start=HOUR)
    assert r.status_code == 201, r.text
    w = r.json()
    assert (w["state"], w["active"], w["requested_by"]) == ("requested", False, "v")
    assert w["permissions"] == ["console", "operate", "vm.read"]
    r = env.api.post(f"/v1/maintenance-windows/{w['id']}/approve")
    assert r.status_code == 200 and (r.json()["state"], r.json()["decided_by"]) == ("approved", "root"), r.text
    assert v.get("/v1/vms/lab1").status_code == 403  # approved, not started yet
    events = env.api.get("/v1/events", params={"subject": f"maintenance-window/{w['id']}"}).json()
    assert [e["kind"] for e in events] == ["maintenance_window_requested", "maintenance_window_approved"], events
    assert "v requested maintenance window" in events[0]["message"] and "lab DB's index" in events[0]["message"]
    clock.now += HOUR + 1
    assert v.get(f"/v1/maintenance-windows/{w['id']}").json()["active"] is True
    # Inside: exactly its VMs.
    assert v.get("/v1/vms/lab1").status_code == 200
    assert [x["name"] for x in v.get("/v1/vms").json()] == ["lab1"]
    r = v.post("/v1/vms/lab1/actions/start", headers=CSRF)
    assert r.status_code == 202, r.text
    assert env.wait(r.json()["job"])["state"] == "succeeded"
    assert v.get(f"/v1/jobs/{r.json()['job']['id']}").status_code == 200
    assert v.get("/v1/vms/lab2").status_code == 403  # of their department, not in the window
    assert v.post("/v1/vms/lab2/actions/start", headers=CSRF).status_code == 403
    assert v.get("/v1/vms/pacs1").status_code == 404
    # Every action is tied to the window in the audit log.
    recs = env.api.get("/v1/audit/records", params={"actor": "v", "action": "POST /v1/vms/lab1"}).json()
    done = [x for x in recs if x["result"]["ok"]]
    assert [x["details"].get("window") for x in done] == [w["id"]], recs
    assert all("window" not in x["details"] for x in recs if not x["result"]["ok"])  # refused: outside a window
    # At its end, the access ends with it (the same session).
    clock.now = w["ends_at"]
    assert v.get("/v1/vms/lab1").status_code == 403
    assert v.post("/v1/vms/lab1/actions/stop", headers=CSRF).status_code == 403
    assert v.get("/v1/vms").json() == []
    shown = v.get(f"/v1/maintenance-windows/{w['id']}").json()
    assert (shown["state"], shown["active"]) == ("expired", False)
    assert env.api.get("/v1/vms/lab1").json()["state"] == "running"  # the refused stop changed nothing
    # The report: what was done, against the plan.
    rep = env.api.get(f"/v1/maintenance-windows/{w['id']}/report").json()
    assert rep["plan"] == "replace the lab DB's index"
    assert [(a["action"], a["target"]) for a in rep["actions"]] == [("POST /v1/vms/lab1/actions/start", "vms/lab1")]
    assert rep["refused"] == 0 and rep["summary"] == {"POST /v1/vms/lab1/actions/start": 1}


def test_a_window_grants_exactly_its_permissions(env: Env, clock: Clock) -> None:
    env.create("lab1", department="lab")
    v = signed_in(env, "v", "vendor", ["lab"])
    w = opened(env, v, clock, ["lab1"], permissions=["vm.read"])
    assert w["permissions"] == ["vm.read"]
    assert v.get("/v1/vms/lab1").status_code == 200
    r = v.post("/v1/vms/lab1/actions/start", headers=CSRF)
    assert r.status_code == 403 and "'operate'" in r.json()["message"], r.text
    assert v.post("/v1/vms/lab1/console-ticket", headers=CSRF).status_code == 403
    assert v.post("/v1/vms", json={"name": "lab3", "image": "tiny"}, headers=CSRF).status_code == 403
    assert env.api.get("/v1/vms/lab1").json()["state"] == "stopped"


def test_the_requester_never_approves_and_only_administrators_do(env: Env, clock: Clock) -> None:
    env.create("lab1", department="lab")
    boss = signed_in(env, "boss", "admin")
    op = signed_in(env, "op", "operator")
    v = signed_in(env, "v", "vendor", ["lab"])
    w = request(boss, clock, ["lab1"]).json()
    r = boss.post(f"/v1/maintenance-windows/{w['id']}/approve", headers=CSRF)
    assert r.status_code == 403, r.text
    assert r.json()["message"] == f"user 'boss' requested maintenance window {w['id']} and may not approve it; " \
        "another administrator does"  # fmt: skip
    assert op.post(f"/v1/maintenance-windows/{w['id']}/approve", headers=CSRF).status_code == 403
    assert v.post(f"/v1/maintenance-windows/{w['id']}/approve", headers=CSRF).status_code == 403
    assert env.api.get(f"/v1/maintenance-windows/{w['id']}").json()["state"] == "requested"  # nothing changed
    assert v.get("/v1/vms/lab1").status_code == 403
    # An operator requests one too; root approves it; approving twice is refused.
    w2 = request(op, clock, ["lab1"]).json()
    assert w2["requested_by"] == "op"
    assert env.api.post(f"/v1/maintenance-windows/{w2['id']}/approve").status_code == 200
    assert env.api.post(f"/v1/maintenance-windows/{w2['id']}/approve").status_code == 409
    # A vendor cannot request for another vendor.
    signed_in(env, "v2", "vendor", ["lab"])
    r = request(v, clock, ["lab1"], vendor="v2")
    assert r.status_code == 403 and "for themselves only" in r.json()["message"], r.text


def test_deny_and_revoke(env: Env, clock: Clock) -> None:
    env.create("lab1", department="lab")
    v = signed_in(env, "v", "vendor", ["lab"])
    w = request(v, clock, ["lab1"]).json()
    assert v.post(f"/v1/maintenance-windows/{w['id']}/deny", headers=CSRF).status_code == 403
    r = env.api.post(f"/v1/maintenance-windows/{w['id']}/deny")
    assert r.status_code == 200 and r.json()["state"] == "denied"
    assert env.api.post(f"/v1/maintenance-windows/{w['id']}/approve").status_code == 409
    assert v.get("/v1/vms/lab1").status_code == 403
    # An active window revoked: access ends at once.
    w = opened(env, v, clock, ["lab1"])
    assert v.get("/v1/vms/lab1").status_code == 200
    r = env.api.post(f"/v1/maintenance-windows/{w['id']}/revoke")
    assert r.status_code == 200 and (r.json()["state"], r.json()["revoked_by"]) == ("revoked", "root")
    assert v.get("/v1/vms/lab1").status_code == 403
    assert env.api.post(f"/v1/maintenance-windows/{w['id']}/revoke").status_code == 409
    # A vendor may give up their own window; another vendor does not even see it.
    w = opened(env, v, clock, ["lab1"])
    other = signed_in(env, "v2", "vendor", ["lab"])
    assert other.get(f"/v1/maintenance-windows/{w['id']}").status_code == 404
    assert other.post(f"/v1/maintenance-windows/{w['id']}/revoke", headers=CSRF).status_code == 404
    assert other.get("/v1/maintenance-windows").json() == []
    assert v.post(f"/v1/maintenance-windows/{w['id']}/revoke", headers=CSRF).json()["state"] == "revoked"


@pytest.mark.parametrize(
    ("change", "status", "words"),
    [
        ({"vms": []}, 422, "at least one VM"),
        ({"vms": ["lab1", "lab1"]}, 422, "twice"),
        ({"vms": ["../etc"]}, 422, "must not contain"),
        ({"vms": ["pacs1"]}, 422, "not of the departments"),
        ({"vms": ["nosuch"]}, 404, "no VM named"),
        ({"vendor": "nobody"}, 422, "no vendor user"),
        ({"vendor": "op"}, 422, "no vendor user"),
        ({"permissions": ["hosts"]}, 422, "grants only"),
        ({"permissions": []}, 422, "at least one permission"),
        ({"plan": "   "}, 422, "work plan"),
        ({"plan": "x\x00y"}, 422, "control characters"),
        ({"plan": "x" * 5000}, 422, "work plan"),
        ({"starts_at": "tomorrow"}, 422, "starts_at"),
        ({"extra": 1}, 422, "extra"),
    ],
)
def test_bad_input_changes_nothing(env: Env, clock: Clock, change: dict[str, Any], status: int, words: str) -> None:
    env.create("lab1", department="lab")
    env.create("pacs1", department="pacs")
    signed_in(env, "v", "vendor", ["lab"])
    signed_in(env, "op", "operator")
    body = {"vendor": "v", "vms": ["lab1"], "starts_at": clock.now, "ends_at": clock.now + HOUR, "plan": "p",
            **change}  # fmt: skip
    r = env.api.post("/v1/maintenance-windows", json=body)
    assert r.status_code == status and words in r.json()["message"], r.text
    assert "\n" not in r.json()["message"]
    assert env.api.get("/v1/maintenance-windows").json() == []


@pytest.mark.parametrize(
    ("start", "length", "words"),
    [
        (0, -60, "ends after it starts"),
        (0, 8 * 86400, "at most 7 days"),
        (-2 * HOUR, HOUR, "in the past"),
        (0, 10, "at least 60 s"),
    ],
)
def test_bad_times_are_refused(env: Env, clock: Clock, start: float, length: float, words: str) -> None:
    env.create("lab1", department="lab")
    v = signed_in(env, "v", "vendor", ["lab"])
    r = request(v, clock, ["lab1"], start=start, length=length)
    assert r.status_code == 422 and words in r.json()["message"], r.text
    assert env.api.get("/v1/maintenance-windows").json() == []


def test_unknown_and_malformed_ids(env: Env, clock: Clock) -> None:
    for wid in ("mw-0000000000", "nope", "mw-ZZZZZZZZZZ"):
        for path in (f"/v1/maintenance-windows/{wid}", f"/v1/maintenance-windows/{wid}/report"):
            assert env.api.get(path).status_code == 404, path
        assert env.api.post(f"/v1/maintenance-windows/{wid}/approve").status_code == 404


def test_a_window_covers_the_vm_it_named_not_a_new_vm_of_that_name(env: Env, clock: Clock) -> None:
    env.create("lab1", department="lab")
    v = signed_in(env, "v", "vendor", ["lab"])
    opened(env, v, clock, ["lab1"])
    r = env.api.delete("/v1/vms/lab1", params={"force": True})
    assert env.wait(r.json()["job"])["state"] == "succeeded"
    env.create("lab1", department="lab")
    assert v.get("/v1/vms/lab1").status_code == 403


def test_cli(env: Env, clock: Clock) -> None:
    from typer.testing import CliRunner

    from kasou.api.client import Client
    from kasou.cli import common
    from kasou.cli import main as cli
    from tests.functional.conftest import TOKEN

    env.create("lab1", department="lab")
    signed_in(env, "v", "vendor", ["lab"])
    boss = signed_in(env, "boss", "admin")
    runner = CliRunner()
    common.client_factory = lambda: Client("http://testserver", TOKEN, http=env.api)
    try:

        def run(*args: str) -> Any:
            return runner.invoke(cli.app, ["maintenance-window", *args], catch_exceptions=True)

        start = time.strftime("%Y-%m-%d %H:%M", time.localtime(clock.now + 60))
        end = time.strftime("%Y-%m-%d %H:%M", time.localtime(clock.now + 3 * HOUR))
        r = run("request", "--vendor", "v", "--vms", "lab1", "--from", start, "--to", end, "--plan",
                "replace the lab DB's index", "--permissions", "vm.read,operate", "--json")  # fmt: skip
        assert r.exit_code == 0, r.output
        w = json.loads(r.output)
        assert (w["state"], w["permissions"], w["requested_by"]) == ("requested", ["operate", "vm.read"], "root")
        # The requester (root) cannot approve: one line, exit 1, nothing changed.
        r = run("approve", w["id"])
        msg = error_of(r)  # one line on stderr: "error: ..."
        assert r.exit_code == 1, r.output
        assert msg.startswith(f"user 'root' requested maintenance window {w['id']} and may not approve it"), msg
        tok = env.api.post("/v1/users/boss/tokens", json={}).json()["token"]
        common.client_factory = lambda: Client("http://testserver", tok, http=boss)
        r = run("approve", w["id"], "--json")
        assert r.exit_code == 0 and json.loads(r.output)["state"] == "approved", r.output
        common.client_factory = lambda: Client("http://testserver", TOKEN, http=env.api)
        listed = json.loads(run("list", "--json").output)
        assert [(x["id"], x["state"]) for x in listed] == [(w["id"], "approved")]
        assert "approved by boss" in run("show", w["id"]).output
        assert json.loads(run("show", w["id"], "--json").output)["decided_by"] == "boss"
        rep = run("report", w["id"])
        assert "replace the lab DB's index" in rep.output and "(nothing)" in rep.output, rep.output
        assert json.loads(run("report", w["id"], "--json").output)["id"] == w["id"]
        r = run("revoke", w["id"], "--json")
        assert json.loads(r.output)["state"] == "revoked"
        r = run("request", "--vendor", "v", "--vms", "lab1", "--from", "soon", "--to", end, "--plan", "x")
        assert r.exit_code == 2 and error_of(r).startswith("--from is a date and time")  # bad input: usage
        assert run("show", "../x").exit_code == 3  # no such window
    finally:
        common.client_factory = None
