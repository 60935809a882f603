"""A vendor's console opened inside a maintenance window closes at the window's end (and when it is revoked),
and its session is tied to the window in the audit log."""

from __future__ import annotations

import time
from typing import Any

import pytest
from starlette.websockets import WebSocketDisconnect

from tests.functional.test_api_console import CSRF, PASSWORD, ROOT, Env, env, rfb_handshake
from tests.functional.test_maintenance_windows import Clock

__all__ = ["env"]  # the console tests' fixture: an agent on a unix socket with the fake RFB server


def vendor_console(env: Env, clock: Clock) -> tuple[dict[str, str], dict[str, Any]]:
    body = {"name": "lab1", "image": "tiny", "vcpus": 1, "memory_mib": 128, "start": True, "department": "lab"}
    r = env.api.post("/v1/vms", json=body, headers=ROOT)
    assert env.wait(r.json()["job"])["state"] == "succeeded"
    body = {"name": "v", "role": "vendor", "password": PASSWORD, "departments": ["lab"]}
    assert env.api.post("/v1/users", json=body, headers=ROOT).status_code == 201
    r = env.api.post("/v1/auth/login", json={"name": "v", "password": PASSWORD})
    env.api.cookies.clear()
    v = {"cookie": f"kasou_session={r.cookies['kasou_session']}", **CSRF}
    assert env.api.post("/v1/vms/lab1/console-ticket", headers=v).status_code == 403  # no window yet
    w = {"vendor": "v", "vms": ["lab1"], "starts_at": clock.now, "ends_at": clock.now + 600, "plan": "check the DB"}
    r = env.api.post("/v1/maintenance-windows", json=w, headers=v)
    assert r.status_code == 201, r.text
    r = env.api.post(f"/v1/maintenance-windows/{r.json()['id']}/approve", headers=ROOT)
    assert r.status_code == 200, r.text
    return v, r.json()


def closed_with(ws: Any) -> tuple[int, str]:
    deadline = time.monotonic() + 10
    with pytest.raises(WebSocketDisconnect) as e:
        while time.monotonic() < deadline:
            ws.receive_bytes()
    return int(e.value.code), str(e.value.reason)


def test_a_vendors_console_closes_when_the_window_ends(env: Env) -> None:
    clock = Clock()
    env.services.windows.clock = clock
    v, w = vendor_console(env, clock)
    r = env.api.post("/v1/vms/lab1/console-ticket", headers=v)
    assert r.status_code == 200, r.text
    with env.api.websocket_connect(r.json()["url"], headers=v) as ws:
        rfb_handshake(ws)
        clock.now = w["ends_at"]  # the window ends: the proxy closes the console within a second
        code, reason = closed_with(ws)
    assert code == 1008 and reason == f"the maintenance window {w['id']} ended", (code, reason)
    deadline = time.monotonic() + 5
    recs: list[Any] = []
    while len(recs) < 3 and time.monotonic() < deadline:  # console_close is written as the proxy ends
        recs = env.api.get("/v1/audit/records", params={"action": "console_"}, headers=ROOT).json()
        time.sleep(0.05)
    assert [x["action"] for x in recs] == ["console_open", "console_close", "console_recording"], recs
    assert all(x["details"]["window"] == w["id"] for x in recs), recs
    assert env.api.post("/v1/vms/lab1/console-ticket", headers=v).status_code == 403


def test_a_vendors_console_closes_when_the_window_is_revoked(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    from kasou.api import console as console_mod

    monkeypatch.setattr(console_mod, "SESSION_CHECK_EVERY_S", 0.2)
    clock = Clock()
    env.services.windows.clock = clock
    v, w = vendor_console(env, clock)
    r = env.api.post("/v1/vms/lab1/console-ticket", headers=v)
    with env.api.websocket_connect(r.json()["url"], headers=v) as ws:
        rfb_handshake(ws)
        assert env.api.post(f"/v1/maintenance-windows/{w['id']}/revoke", headers=ROOT).status_code == 200
        code, reason = closed_with(ws)
    assert code == 1008 and reason == f"the maintenance window {w['id']} is revoked", (code, reason)
