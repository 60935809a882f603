"""Console sessions recorded in the proxy (kasou.api.recordings): who is recorded (staff and vendors always,
clinicians by their pool), the recording's record in the audit chain, /v1/recordings (list filters, replay
stream, export, permissions), a disk that cannot take the recording, and retention."""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path
from typing import Any

import pytest
from starlette.websockets import WebSocketDisconnect

from kasou.api import recordings as api_rec
from kasou.api.console import NOT_RECORDED
from kasou.control import recordings as rec
from kasou.control.recording_store import for_store
from kasou.model.desktops import ConsolePolicy
from tests.functional.test_api_console import ROOT, Env, env, received, rfb_handshake
from tests.functional.test_maintenance_windows import Clock
from tests.functional.test_window_console import closed_with, vendor_console

__all__ = ["env"]  # the console tests' fixture: an agent on a unix socket with the fake RFB server

KEY_A = struct.pack(">BBxxI", 4, 1, ord("l")) + struct.pack(">BBxxI", 4, 0, ord("l"))
KEYS = b"".join(struct.pack(">BBxxI", 4, 1, ord(c)) for c in "ls -l") + struct.pack(">BBxxI", 4, 1, 0xFF0D)


def recorded(env: Env, n: int = 1) -> list[dict[str, Any]]:
    """The console_recording records in the audit chain, once there are n."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        recs = env.api.get("/v1/audit/records", params={"action": "console_recording"}, headers=ROOT).json()
        recs = [r for r in recs if r["action"] == "console_recording"]
        if len(recs) >= n:
            return list(recs)
        time.sleep(0.05)
    raise AssertionError(f"fewer than {n} console_recording records")


def use_console(env: Env, vm: str, headers: dict[str, str], keys: bytes = KEYS) -> None:
    r = env.api.post(f"/v1/vms/{vm}/console-ticket", headers=headers)
    assert r.status_code == 200, r.text
    with env.api.websocket_connect(r.json()["url"], headers=headers) as ws:
        rfb_handshake(ws)
        ws.send_bytes(keys)
        ws.send_bytes(struct.pack(">BBHHHH", 3, 0, 0, 0, 64, 48))
        assert ws.receive_bytes()[:4] == b"\x00\x00\x00\x01"
        received(env, vm, len(keys) + 10)


def test_an_operators_console_is_recorded_sealed_and_exported(env: Env, tmp_path: Path) -> None:
    env.vm("emr1")
    op = env.user("nurse-it", "operator")
    use_console(env, "emr1", op)
    [a] = recorded(env)
    d = a["details"]
    assert a["actor"]["name"] == "nurse-it" and a["target"] == "vms/emr1" and a["result"]["ok"]
    assert d["state"] == "complete" and d["size"] > 0 and len(d["sha256"]) == 64 and d["ended"] >= d["started"]
    closes = env.api.get("/v1/audit/records", params={"action": "console_close"}, headers=ROOT).json()
    assert closes[-1]["details"]["console"] == d["console"]  # tied to the console's own records
    opens = env.api.get("/v1/audit/records", params={"action": "console_open"}, headers=ROOT).json()
    assert opens[-1]["details"]["recording"] == d["recording"]
    f = tmp_path / "recordings" / f"{d['recording']}.kasourec"
    assert oct(f.stat().st_mode & 0o777) == "0o600" and oct(f.parent.stat().st_mode & 0o777) == "0o700"
    assert b"emr1" not in f.read_bytes() and b"nurse-it" not in f.read_bytes()  # sealed, metadata too
    [m] = env.api.get("/v1/recordings", headers=ROOT).json()
    assert (m["id"], m["vm"], m["user"], m["kind"], m["sha256"]) == (d["recording"], "emr1", "nurse-it", "vnc",
                                                                     d["sha256"])  # fmt: skip
    r = env.api.get(f"/v1/recordings/{m['id']}/stream", headers=ROOT)
    assert r.status_code == 200
    evs, pos, raw = [], 0, r.content
    while pos < len(raw):
        direction, us, n = rec.EVENT.unpack_from(raw, pos)
        evs.append((direction, us, raw[pos + 13 : pos + 13 + n]))
        pos += 13 + n
    assert evs[0] == (0, evs[0][1], b"RFB 003.008\n")
    assert KEYS in b"".join(x for dd, _, x in evs if dd == 1)
    r = env.api.get(f"/v1/recordings/{m['id']}/export", headers=ROOT)
    assert r.status_code == 200 and r.content.startswith(api_rec.EXPORT_MAGIC)
    head = json.loads(r.content[len(api_rec.EXPORT_MAGIC) :].split(b"\n", 1)[0])
    assert head["digest_ok"] and head["typed"] == "ls -l\n" and head["recording"]["id"] == m["id"]
    exports = env.api.get("/v1/audit/records", params={"action": "console_recording_export"}, headers=ROOT).json()
    assert exports and exports[-1]["details"]["recording"] == m["id"] and exports[-1]["details"]["digest_ok"]
    assert env.api.get("/v1/audit/verify", headers=ROOT).json()["ok"] is True


def test_a_vendors_console_is_recorded_with_its_window(env: Env) -> None:
    clock = Clock()
    env.services.windows.clock = clock
    v, w = vendor_console(env, clock)
    use_console(env, "lab1", v)
    [a] = recorded(env)
    assert a["details"]["window"] == w["id"] and a["actor"]["role"] == "vendor"
    assert [m["user"] for m in env.api.get("/v1/recordings", params={"window": w["id"]}, headers=ROOT).json()] == ["v"]
    assert env.api.get("/v1/recordings", params={"window": "nope"}, headers=ROOT).json() == []
    assert [m["vm"] for m in env.api.get("/v1/recordings", params={"user": "v"}, headers=ROOT).json()] == ["lab1"]
    assert env.api.get("/v1/recordings", params={"vm": "emr1"}, headers=ROOT).json() == []
    assert env.api.get("/v1/recordings", headers=v).status_code == 403  # a vendor never reads recordings


def test_a_clinicians_desktop_is_recorded_only_when_its_pool_says(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    env.vm("ward-01")
    doc = env.user("dr-sato", "clinician")

    async def may_open(user: str, vm: str) -> bool:
        return (user, vm) == ("dr-sato", "ward-01")

    policy = {"record": False}

    async def console_policy(vm: str) -> ConsolePolicy:
        return ConsolePolicy(record=policy["record"])

    monkeypatch.setattr(env.services.vms.desktops, "user_may_open", may_open)
    monkeypatch.setattr(env.services.vms.desktops, "console_policy", console_policy)
    use_console(env, "ward-01", doc, KEY_A)
    time.sleep(0.3)
    assert env.api.get("/v1/recordings", headers=ROOT).json() == []
    policy["record"] = True
    use_console(env, "ward-01", doc, KEY_A)
    [a] = recorded(env)
    assert a["actor"]["name"] == "dr-sato"


@pytest.mark.parametrize("role", ["auditor", "admin"])
def test_auditors_and_administrators_read_recordings_others_do_not(env: Env, role: str) -> None:
    env.vm("emr1")
    use_console(env, "emr1", ROOT, KEY_A)
    [a] = recorded(env)
    rid = a["details"]["recording"]
    who = env.user("reader", role)
    assert [m["id"] for m in env.api.get("/v1/recordings", headers=who).json()] == [rid]
    assert env.api.get(f"/v1/recordings/{rid}", headers=who).status_code == 200
    assert env.api.get(f"/v1/recordings/{rid}/export", headers=who).status_code == 200
    for other in ("operator", "clinician"):
        h = env.user(f"no-{other}", other)
        assert env.api.get("/v1/recordings", headers=h).status_code == 403
        assert env.api.get(f"/v1/recordings/{rid}/export", headers=h).status_code == 403
    assert env.api.get("/v1/recordings/not-an-id", headers=ROOT).status_code == 404


def test_a_full_disk_closes_a_vendors_console_and_is_raised_for_others(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = Clock()
    env.services.windows.clock = clock
    v, _ = vendor_console(env, clock)
    env.vm("emr1")
    calls = {"n": 0}
    real = rec.write_all

    def full(f: Any, data: bytes) -> None:
        calls["n"] += 1
        if calls["n"] > 1:  # the header goes in; the first chunk of events does not
            raise OSError(28, "No space left on device")
        real(f, data)

    monkeypatch.setattr(rec, "write_all", full)
    monkeypatch.setattr(rec, "CHUNK_BYTES", 1)  # every event is a chunk of its own
    r = env.api.post("/v1/vms/lab1/console-ticket", headers=v)
    with env.api.websocket_connect(r.json()["url"], headers=v) as ws:
        code, reason = closed_with(ws)  # at the first chunk: the server's greeting
    assert code == api_rec_code() and "No space left" in reason, (code, reason)
    [a] = recorded(env)
    assert a["result"]["ok"] is False and a["details"]["state"] == "incomplete"
    calls["n"] = 0
    r = env.api.post("/v1/vms/emr1/console-ticket", headers=ROOT)
    with env.api.websocket_connect(r.json()["url"], headers=ROOT) as ws:  # an administrator's goes on
        rfb_handshake(ws)
        ws.send_bytes(struct.pack(">BBHHHH", 3, 0, 0, 0, 64, 48))
        assert ws.receive_bytes()[:4] == b"\x00\x00\x00\x01"
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        events = env.api.get("/v1/events", params={"subject": "vm/emr1"}, headers=ROOT).json()
        if any(e["kind"] == "console_recording_failed" and e["severity"] == "error" for e in events):
            break
        time.sleep(0.05)
    else:
        raise AssertionError("no console_recording_failed event")
    # A directory that cannot be made: a vendor's console does not open at all; nothing is connected.
    monkeypatch.setattr(rec, "write_all", real)
    blocker = Path(str(for_store(env.services.store).directory) + "-file")
    blocker.write_text("")
    for_store(env.services.store).directory = blocker / "sub"
    r = env.api.post("/v1/vms/lab1/console-ticket", headers=v)
    with env.api.websocket_connect(r.json()["url"], headers=v) as ws, pytest.raises(WebSocketDisconnect) as e:
        ws.receive_bytes()
    assert e.value.code == api_rec_code() and "only recorded" in (e.value.reason or "")


def api_rec_code() -> int:
    return NOT_RECORDED


def test_retention_deletes_old_recordings_audited_and_keeps_held_ones(env: Env) -> None:
    env.vm("emr1")
    use_console(env, "emr1", ROOT, KEY_A)
    use_console(env, "emr1", ROOT, KEY_A)
    a, b = recorded(env, 2)
    keep = b["details"]["recording"]
    assert env.api.post(f"/v1/recordings/{keep}/hold", headers=ROOT).json()["hold"] is True
    recs = for_store(env.services.store)
    assert env.api.portal is not None
    gone = env.api.portal.call(recs.sweep, time.time() + 401 * 86400, True)  # on the app's event loop
    assert gone == [a["details"]["recording"]]
    assert [m["id"] for m in env.api.get("/v1/recordings", headers=ROOT).json()] == [keep]
    assert not recs.path(a["details"]["recording"]).exists() and recs.path(keep).exists()
    dels = env.api.get("/v1/audit/records", params={"action": "console_recording_deleted"}, headers=ROOT).json()
    assert [x["details"]["recording"] for x in dels] == [a["details"]["recording"]]
    assert dels[0]["details"]["retention_days"] == 400 and dels[0]["actor"]["role"] == "system"


def test_a_serial_console_is_recorded_with_what_was_typed(env: Env) -> None:
    env.vm("emr1")
    op = env.user("op1", "operator")
    r = env.api.post("/v1/vms/emr1/console-ticket", params={"kind": "serial"}, headers=op)
    with env.api.websocket_connect(r.json()["url"], headers=op) as ws:
        assert ws.receive_bytes() == b"emr1 login: "
        ws.send_bytes(b"root\n")
        assert ws.receive_bytes() == b"echo: root\n"
    [a] = recorded(env)
    assert a["details"]["kind"] == "serial" and a["details"]["state"] == "complete"
    r = env.api.get(f"/v1/recordings/{a['details']['recording']}/export", headers=ROOT)
    head = json.loads(r.content[len(api_rec.EXPORT_MAGIC) :].split(b"\n", 1)[0])
    assert head["typed"] == "root\n" and head["digest_ok"]
    assert b"emr1 login: " in r.content and b"echo: root\n" in r.content  # the events, decrypted
