"""The console proxy end to end with the fake driver: browser websocket -> API -> agent (a real uvicorn on a
unix socket, as on one host) -> the fake driver's RFB server. Ticket rules, the clipboard filter, events."""

from __future__ import annotations

import shutil
import struct
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from argon2 import PasswordHasher
from fastapi.testclient import TestClient
from starlette.websockets import WebSocketDisconnect

from kasou.agent.app import Agent, create_agent_app
from kasou.agent.client import AgentClient
from kasou.agent.storage import LocalDisks
from kasou.api import console as console_mod
from kasou.api.app import create_app
from kasou.api.deps import Services
from kasou.control import users as users_mod
from kasou.control.hosts import Agents
from kasou.store.sqlite import SqliteStore
from tests.doubles.driver import FakeDriver
from tests.functional.conftest import TOKEN, make_fake_image

ROOT = {"Authorization": f"Bearer {TOKEN}"}
PASSWORD = "correct-horse-battery"
CSRF = {"x-kasou-csrf": "1"}


@dataclass
class Env:
    api: TestClient
    driver: FakeDriver
    services: Services

    def wait(self, job: dict[str, Any]) -> dict[str, Any]:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            j = self.api.get(f"/v1/jobs/{job['id']}", headers=ROOT).json()
            if j["state"] in ("succeeded", "failed"):
                return dict(j)
            time.sleep(0.01)
        raise AssertionError("job did not finish")

    def vm(self, name: str, start: bool = True) -> None:
        body = {"name": name, "image": "tiny", "vcpus": 1, "memory_mib": 128, "start": start}
        r = self.api.post("/v1/vms", json=body, headers=ROOT)
        assert r.status_code == 202, r.text
        assert self.wait(r.json()["job"])["state"] == "succeeded"

    def user(self, name: str, role: str) -> dict[str, str]:
        """A user signed in; the headers that carry its session (the cookie) and the CSRF mark."""
        r = self.api.post("/v1/users", json={"name": name, "role": role, "password": PASSWORD}, headers=ROOT)
        assert r.status_code == 201, r.text
        r = self.api.post("/v1/auth/login", json={"name": name, "password": PASSWORD})
        assert r.status_code == 200, r.text
        self.api.cookies.clear()  # each request names its session itself
        return {"cookie": f"kasou_session={r.cookies['kasou_session']}", **CSRF}

    def ticket(self, vm: str, headers: dict[str, str]) -> str:
        r = self.api.post(f"/v1/vms/{vm}/console-ticket", headers=headers)
        assert r.status_code == 200, r.text
        assert r.json()["url"] == f"/v1/console/ws?ticket={r.json()['ticket']}"
        return str(r.json()["ticket"])

    def refused(self, path: str, headers: dict[str, str]) -> int:
        """Connect and read: the close code the proxy answered with (it must close before any RFB byte)."""
        with self.api.websocket_connect(path, headers=headers) as ws, pytest.raises(WebSocketDisconnect) as e:
            ws.receive_bytes()
        return int(e.value.code)


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Env]:
    monkeypatch.setattr(users_mod, "_hasher", PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1))  # fast
    images = tmp_path / "images"
    make_fake_image(images)
    driver = FakeDriver()
    agent = Agent(host="host1", driver=driver, disks=LocalDisks(tmp_path / "disks", images), accelerator="tcg",
                  accelerator_reason="test", qemu_version="7.2", images=lambda: ["tiny"])  # fmt: skip
    sockdir = Path(tempfile.mkdtemp(prefix="kasou-ct-", dir="/tmp"))  # a short path for the unix socket
    sock = sockdir / "agent.sock"
    server = uvicorn.Server(uvicorn.Config(create_agent_app(agent), uds=str(sock), log_level="warning"))
    thread = threading.Thread(target=server.run, name="agent", daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline, "the agent did not start"
        time.sleep(0.02)
    holder: dict[str, Services] = {}

    async def factory() -> Services:
        agents = Agents({"host1": AgentClient("host1", uds=str(sock))})
        holder["svc"] = Services.build(SqliteStore(tmp_path / "state.db"), agents, shutdown_timeout=2)
        return holder["svc"]

    try:
        with TestClient(create_app(factory, TOKEN), base_url="http://testserver") as api:
            yield Env(api, driver, holder["svc"])
    finally:
        server.should_exit = True
        thread.join(15)
        shutil.rmtree(sockdir, ignore_errors=True)


def rfb_handshake(ws: Any) -> bytes:
    """Be an RFB 3.8 client up to ServerInit; returns the ServerInit message."""
    assert ws.receive_bytes() == b"RFB 003.008\n"
    ws.send_bytes(b"RFB 003.008\n")
    assert ws.receive_bytes() == b"\x01\x01"
    ws.send_bytes(b"\x01")
    assert ws.receive_bytes() == b"\x00\x00\x00\x00"
    ws.send_bytes(b"\x01")
    return bytes(ws.receive_bytes())


def received(env: Env, vm: str, n: int) -> bytes:
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        srv = env.driver.__dict__.get("rfb", {}).get(vm)
        if srv is not None and len(srv.received) >= n:
            return bytes(srv.received)
        time.sleep(0.02)
    raise AssertionError("the display did not get the bytes")


def test_operator_console_carries_keys_and_keeps_the_clipboard_from_the_vm(env: Env) -> None:
    env.vm("emr1")
    op = env.user("nurse-it", "operator")
    t = env.ticket("emr1", op)
    with env.api.websocket_connect(f"/v1/console/ws?ticket={t}", headers=op) as ws:
        init = rfb_handshake(ws)
        assert struct.unpack(">HH", init[:4]) == (64, 48) and init.endswith(b"emr1")
        key = struct.pack(">BBxxI", 4, 1, 0x61)
        cut = struct.pack(">BxxxI", 6, 12) + b"patient 4711"
        encs = struct.pack(">BxH3I", 2, 3, 0, 0xC0A1E5CE, 7)
        ws.send_bytes(key + cut + encs)
        ws.send_bytes(struct.pack(">BBHHHH", 3, 0, 0, 0, 64, 48))  # an update request: the screen comes back
        update = ws.receive_bytes()
        assert update[:4] == b"\x00\x00\x00\x01"
        got = received(env, "emr1", len(key) + 12 + 10)
    assert got == key + struct.pack(">BxH2I", 2, 2, 0, 7) + struct.pack(">BBHHHH", 3, 0, 0, 0, 64, 48)
    assert b"patient" not in got
    events = env.api.get("/v1/events", params={"subject": "vm/emr1"}, headers=ROOT).json()
    kinds = [e["kind"] for e in events]
    assert "console_opened" in kinds
    deadline = time.monotonic() + 5
    while "console_closed" not in kinds and time.monotonic() < deadline:
        time.sleep(0.05)
        kinds = [e["kind"] for e in env.api.get("/v1/events", params={"subject": "vm/emr1"}, headers=ROOT).json()]
    closed = [e for e in env.api.get("/v1/events", params={"subject": "vm/emr1"}, headers=ROOT).json()
              if e["kind"] == "console_closed"]  # fmt: skip
    assert closed and "nurse-it" in closed[0]["message"] and "1 clipboard message" in closed[0]["message"]


def test_a_ticket_is_used_once(env: Env) -> None:
    env.vm("emr1")
    op = env.user("op1", "operator")
    t = env.ticket("emr1", op)
    with env.api.websocket_connect(f"/v1/console/ws?ticket={t}", headers=op) as ws:
        assert ws.receive_bytes() == b"RFB 003.008\n"
    assert env.refused(f"/v1/console/ws?ticket={t}", op) == 1008
    clients = env.driver.__dict__["rfb"]["emr1"].clients
    assert clients == 1  # the reused ticket connected nothing


def test_an_expired_ticket_is_refused(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    env.vm("emr1")
    op = env.user("op1", "operator")
    monkeypatch.setattr(console_mod, "TICKET_TTL_S", 0.2)
    t = env.ticket("emr1", op)
    time.sleep(0.3)
    assert env.refused(f"/v1/console/ws?ticket={t}", op) == 1008
    assert "rfb" not in env.driver.__dict__  # no display was ever connected


def test_a_ticket_works_only_for_the_session_that_asked(env: Env) -> None:
    env.vm("emr1")
    a = env.user("op-a", "operator")
    b = env.user("op-b", "operator")
    t = env.ticket("emr1", a)
    assert env.refused(f"/v1/console/ws?ticket={t}", b) == 1008  # another user's cookie
    t = env.ticket("emr1", a)
    assert env.refused(f"/v1/console/ws?ticket={t}", {}) == 1008  # no cookie at all
    t = env.ticket("emr1", ROOT)
    assert env.refused(f"/v1/console/ws?ticket={t}", {}) == 1008  # a token's ticket needs the token
    assert "rfb" not in env.driver.__dict__


def test_clinician_gets_only_their_own_desktop(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    env.vm("ward-01")
    env.vm("emr1")
    c = env.user("dr-sato", "clinician")
    assert env.api.post("/v1/vms/ward-01/console-ticket", headers=c).status_code == 403

    async def may_open(user: str, vm: str) -> bool:
        return (user, vm) == ("dr-sato", "ward-01")

    monkeypatch.setattr(env.services.vms.desktops, "user_may_open", may_open)
    assert env.api.post("/v1/vms/emr1/console-ticket", headers=c).status_code == 403  # the wrong VM
    t = env.ticket("ward-01", c)
    with env.api.websocket_connect(f"/v1/console/ws?ticket={t}", headers=c) as ws:
        assert ws.receive_bytes() == b"RFB 003.008\n"
    monkeypatch.setattr(env.services.vms, "desktops", None)  # no desktops service: clinicians get nothing
    assert env.api.post("/v1/vms/ward-01/console-ticket", headers=c).status_code == 403


def test_refusals_without_a_ticket_or_credentials(env: Env) -> None:
    env.vm("emr1")
    c = env.user("dr-sato", "clinician")
    assert env.refused("/v1/console/ws", c) == 1008
    assert env.refused("/v1/console/ws?ticket=guessed", c) == 1008
    assert env.api.post("/v1/vms/emr1/console-ticket").status_code == 401
    op = env.user("op1", "operator")
    assert env.api.post("/v1/vms/emr1/console-ticket", headers={"cookie": op["cookie"]}).status_code == 403  # no CSRF
    t = env.ticket("emr1", op)
    assert env.refused(f"/v1/console/ws?ticket={t}", {**op, "origin": "http://evil.example"}) == 1008
    assert "rfb" not in env.driver.__dict__


def test_a_stopped_vm_has_no_console(env: Env) -> None:
    env.vm("emr1", start=False)
    r = env.api.post("/v1/vms/emr1/console-ticket", headers=ROOT)
    assert r.status_code == 409 and "stopped" in r.json()["message"]
    assert env.api.post("/v1/vms/nosuch/console-ticket", headers=ROOT).status_code == 404


def test_sign_out_closes_the_sessions_consoles(env: Env) -> None:
    env.vm("emr1")
    op = env.user("op1", "operator")
    t = env.ticket("emr1", op)
    with env.api.websocket_connect(f"/v1/console/ws?ticket={t}", headers=op) as ws:
        rfb_handshake(ws)
        assert env.api.post("/v1/auth/logout", headers=op).status_code == 200
        with pytest.raises(WebSocketDisconnect) as e:
            for _ in range(10):
                ws.receive_bytes()
        assert e.value.code == 1000 and "signed out" in (e.value.reason or "")


def audit_records(env: Env, action: str) -> list[dict[str, Any]]:
    r = env.api.get("/v1/audit/records", params={"action": action}, headers=ROOT)
    assert r.status_code == 200, r.text
    return list(r.json())


def wait_for_record(env: Env, action: str, n: int = 1) -> list[dict[str, Any]]:
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        recs = audit_records(env, action)
        if len(recs) >= n:
            return recs
        time.sleep(0.05)
    raise AssertionError(f"no {action} record")


def test_console_sessions_are_in_the_audit_chain(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    """Who opened which VM's console, from where, for how long, how many bytes: records in the hash chain
    (console_open, console_close), for an operator's console and a clinician's desktop alike."""
    env.vm("emr1")
    env.vm("ward-01")
    op = env.user("nurse-it", "operator")
    t = env.ticket("emr1", op)
    with env.api.websocket_connect(f"/v1/console/ws?ticket={t}", headers=op) as ws:
        rfb_handshake(ws)
        ws.send_bytes(struct.pack(">BBxxI", 4, 1, 0x61))
        received(env, "emr1", 8)
        opened = wait_for_record(env, "console_open")
    closed = wait_for_record(env, "console_close")
    o, c = opened[-1], closed[-1]
    assert o["actor"] == {"name": "nurse-it", "role": "operator", "via": "session"} and c["actor"] == o["actor"]
    assert (o["target"], o["source"], o["result"]["ok"]) == ("vms/emr1", "testclient", True)
    assert (c["target"], c["source"], c["result"]["ok"]) == ("vms/emr1", "testclient", True)
    assert c["details"]["console"] == o["details"]["console"] and c["details"]["duration_s"] >= 0
    assert c["details"]["bytes_from_client"] >= 8 and c["details"]["bytes_to_client"] > 12
    assert c["details"]["reason"]
    assert env.api.get("/v1/audit/verify", headers=ROOT).json()["ok"] is True

    async def may_open(user: str, vm: str) -> bool:
        return (user, vm) == ("dr-sato", "ward-01")

    doc = env.user("dr-sato", "clinician")
    monkeypatch.setattr(env.services.vms.desktops, "user_may_open", may_open)
    t = env.ticket("ward-01", doc)
    with env.api.websocket_connect(f"/v1/console/ws?ticket={t}", headers=doc) as ws:
        assert ws.receive_bytes() == b"RFB 003.008\n"
    recs = wait_for_record(env, "console_close", 2)
    assert recs[-1]["actor"]["name"] == "dr-sato" and recs[-1]["target"] == "vms/ward-01"
    # A ticket presented with another user's session: refused, and recorded as a refused console_open.
    t = env.ticket("emr1", op)
    assert env.refused(f"/v1/console/ws?ticket={t}", doc) == 1008
    refused = audit_records(env, "console_open")[-1]
    assert refused["result"]["ok"] is False and refused["actor"]["name"] == "nurse-it"
    assert "another session" in refused["result"]["message"]


def token_user(env: Env, name: str, role: str = "operator") -> tuple[str, dict[str, str]]:
    """A user with an API token: its id and the headers that carry the token."""
    r = env.api.post("/v1/users", json={"name": name, "role": role, "password": PASSWORD}, headers=ROOT)
    assert r.status_code == 201, r.text
    r = env.api.post(f"/v1/users/{name}/tokens", json={"label": "script"}, headers=ROOT)
    assert r.status_code == 201, r.text
    return str(r.json()["id"]), {"Authorization": f"Bearer {r.json()['token']}"}


@pytest.mark.parametrize("end", ["revoke", "delete"])
def test_a_token_console_ends_when_its_token_is_revoked(env: Env, monkeypatch: pytest.MonkeyPatch, end: str) -> None:
    """A console opened with a user's API token is re-checked like a session's: revoking the token (or
    deleting its user) closes it within the re-check period, even while the console is in use."""
    monkeypatch.setattr(console_mod, "SESSION_CHECK_EVERY_S", 0.5)
    env.vm("emr1")
    tid, bearer = token_user(env, "script-op")
    t = env.ticket("emr1", bearer)
    with env.api.websocket_connect(f"/v1/console/ws?ticket={t}", headers=bearer) as ws:
        rfb_handshake(ws)
        if end == "revoke":
            r = env.api.delete(f"/v1/users/script-op/tokens/{tid}", headers=ROOT)
        else:
            r = env.api.delete("/v1/users/script-op", headers=ROOT)
        assert r.status_code == 204, r.text
        started = time.monotonic()
        with pytest.raises(WebSocketDisconnect) as e:
            while time.monotonic() - started < 5:
                ws.send_bytes(struct.pack(">BBHHHH", 3, 0, 0, 0, 64, 48))  # in use: update requests
                ws.receive_bytes()
                time.sleep(0.05)
    assert e.value.code == 1008 and "token" in (e.value.reason or ""), e.value.reason


def test_the_serial_console_carries_a_terminal_one_at_a_time_and_is_audited(env: Env) -> None:
    env.vm("emr1")
    op = env.user("op1", "operator")
    r = env.api.post("/v1/vms/emr1/console-ticket", params={"kind": "serial"}, headers=op)
    assert r.status_code == 200, r.text
    with env.api.websocket_connect(r.json()["url"], headers=op) as ws:
        assert ws.receive_bytes() == b"emr1 login: "
        ws.send_bytes(b"root\n")
        assert ws.receive_bytes() == b"echo: root\n"
        second = env.api.post("/v1/vms/emr1/console-ticket", params={"kind": "serial"}, headers=op).json()
        with env.api.websocket_connect(second["url"], headers=op) as ws2, pytest.raises(WebSocketDisconnect) as e:
            ws2.receive_bytes()
        assert "in use by another terminal" in str(e.value.reason), e.value
    closed = wait_for_record(env, "console_close", 2)
    assert [r["details"]["kind"] for r in closed] == ["serial", "serial"], closed
    assert any("in use by another terminal" in r["details"]["reason"] for r in closed), closed
    nurse = env.user("nurse", "clinician")
    r = env.api.post("/v1/vms/emr1/console-ticket", params={"kind": "serial"}, headers=nurse)
    assert r.status_code == 403, r.text
    r = env.api.post("/v1/vms/emr1/console-ticket", params={"kind": "ssh"}, headers=op)
    assert r.status_code == 422, r.text
