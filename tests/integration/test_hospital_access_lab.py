"""Hospital access end to end on the 3-host lab with a real Samba AD domain controller (``kasou lab up --hosts 3
--directory``), over the lab's HTTPS API:

* the lab department's vendor and its manager sign in with their directory passwords (roles from AD groups);
* outside a maintenance window the vendor can do nothing to the department's VM; the vendor asks for a window,
  may not approve it, the department's manager does;
* inside it the vendor opens the VM's console (a real RFB stream from a real guest) and it is recorded, sealed,
  named in the audit log with the window, and replays (decrypted) from the recordings API;
* the manager revokes the window and the vendor is refused again;
* the window's report and the month's access-log review (HTML) show all of it, the audit chain intact.

Minutes (a lab, a domain controller, a guest): ``pytest -m scenario``, under the machine's QEMU lock.
"""

from __future__ import annotations

import json
import ssl
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.sync.client import connect

from tests.integration.test_cluster import Lab, make_lab

pytestmark = [pytest.mark.qemu, pytest.mark.directory, pytest.mark.scenario, pytest.mark.timeout(1200)]

VM = "lab-db"


@pytest.fixture(scope="module")
def lab(tiny_image: Path) -> Iterator[Lab]:
    yield from make_lab(tiny_image, "kasou-acclab-", directory=True)


def _api(lab: Lab, host: str = "h2") -> tuple[str, str, str]:
    env = lab.host_env(host)
    return env["KASOU_API"], env["KASOU_CA"], env["KASOU_TOKEN"]


def _signed_in(url: str, ca: str, user: str, password: str) -> httpx.Client:
    c = httpx.Client(base_url=url, verify=ca, timeout=30, headers={"x-kasou-csrf": "1"})
    r = c.post("/v1/auth/login", json={"name": user, "password": password})
    assert r.status_code == 200, r.text
    return c


def test_a_directory_vendor_works_only_inside_a_window_its_manager_approved_and_is_recorded(lab: Lab) -> None:
    url, ca, token = _api(lab)
    root = httpx.Client(base_url=url, verify=ca, timeout=60, headers={"Authorization": f"Bearer {token}"})
    passwords = json.loads((lab.dir / "directory" / "passwords.json").read_text())["users"]
    assert root.get("/v1/directory/status").json()["directory"] == "ok"
    lab.run("vm", "create", VM, "--image", "tiny", "--department", "lab", "--start")
    lab.ready(VM)

    t0 = time.monotonic()
    vendor = _signed_in(url, ca, "dir-vendor", passwords)
    sign_in_s = time.monotonic() - t0
    me_r = vendor.get("/v1/auth/me")
    assert me_r.status_code == 200, (me_r.status_code, me_r.text, dict(vendor.cookies))
    me = me_r.json()
    assert me["role"] == "vendor" and me["departments"] == ["lab"] and me["source"] == "directory", me
    manager = _signed_in(url, ca, "dir-manager", passwords)
    assert manager.get("/v1/auth/me").json()["role"] == "manager"

    # Outside a window: nothing.
    r = vendor.post(f"/v1/vms/{VM}/console-ticket")
    assert r.status_code == 403 and "window" in r.json()["message"], r.text
    assert vendor.post(f"/v1/vms/{VM}/actions/stop").status_code == 403

    # The vendor asks; it may not approve its own request; the department's manager does.
    now = time.time()
    w = vendor.post(
        "/v1/maintenance-windows",
        json={
            "vendor": "dir-vendor",
            "vms": [VM],
            "starts_at": now - 5,
            "ends_at": now + 900,
            "plan": "rebuild the lab DB's index",
        },
    )
    assert w.status_code in (200, 201), w.text
    wid = w.json()["id"]
    assert vendor.post(f"/v1/maintenance-windows/{wid}/approve").status_code == 403
    a = manager.post(f"/v1/maintenance-windows/{wid}/approve")
    assert a.status_code == 200 and a.json()["state"] == "active", a.text

    # Inside it: the console, a real RFB stream, recorded.
    ticket = vendor.post(f"/v1/vms/{VM}/console-ticket")
    assert ticket.status_code == 200, ticket.text
    ctx = ssl.create_default_context(cafile=ca)
    cookie = "; ".join(f"{k}={v}" for k, v in vendor.cookies.items())
    ws_url = url.replace("https://", "wss://") + ticket.json()["url"]
    with connect(ws_url, ssl=ctx, additional_headers={"Cookie": cookie}, open_timeout=30, close_timeout=5) as ws:
        banner = ws.recv(timeout=30)
        assert isinstance(banner, bytes) and banner.startswith(b"RFB 003.00"), banner
        ws.send(b"RFB 003.008\n")
        types = ws.recv(timeout=30)
        assert isinstance(types, bytes) and len(types) >= 2
    recs = lab.wait("the recording", lambda: [m for m in root.get("/v1/recordings", params={"vm": VM}).json()
                                              if m.get("ended")], timeout=60)  # fmt: skip
    rec = recs[-1]
    assert rec["user"] == "dir-vendor" and rec["window"] == wid, rec
    stream = root.get(f"/v1/recordings/{rec['id']}/stream")
    assert stream.status_code == 200 and b"RFB 003.00" in stream.content

    # Revoked: refused again.
    assert manager.post(f"/v1/maintenance-windows/{wid}/revoke").status_code == 200
    assert vendor.post(f"/v1/vms/{VM}/console-ticket").status_code == 403

    # What the department signs off, and the month's review.
    report = root.get(f"/v1/maintenance-windows/{wid}/report").json()
    text = json.dumps(report)
    assert "rebuild the lab DB's index" in text and "console" in text, text[:2000]
    review = root.get("/v1/audit/review", params={"since": "1d", "format": "html"})
    assert review.status_code == 200 and "text/html" in review.headers["content-type"]
    html = review.text
    for needle in ("dir-vendor", "dir-manager", wid, rec["id"]):
        assert needle in html, needle
    verified: Any = root.get("/v1/audit/verify").json()
    assert verified["ok"] is True, verified
    print(
        f"\ndirectory sign-in through the lab's API {sign_in_s * 1000:.0f} ms; recording {rec['id']} "
        f"{rec.get('size', '?')} bytes"
    )
    lab.run("vm", "delete", VM, "--force")
