"""The web console in Debian's real Chromium against kasou running a real tiny guest.

An operator signs in, sees the VM, starts it from the dashboard, opens its console (noVNC through the
API's websocket proxy to the VM's VNC socket), sees the guest's text screen, types a command into the
guest's shell on tty1 and sees it work (in the serial log and on the screen); a reused or expired
ticket is refused; signing out closes the console; a clinician gets no console.
"""

from __future__ import annotations

import time
from typing import Any

import httpx
import pytest

from tests.browser.conftest import shot
from tests.integration.conftest import Kasou

pytestmark = pytest.mark.qemu

WS_PROBE = """async (url) => await new Promise((done) => {
  const ws = new WebSocket(url);
  ws.binaryType = "arraybuffer";
  let first = null;
  ws.onmessage = (m) => { if (first === null) { first = new TextDecoder().decode(m.data); ws.close(); } };
  ws.onclose = (e) => done({ code: e.code, reason: e.reason, first });
  setTimeout(() => done({ code: -1, reason: "timeout", first }), 15000);
})"""

FETCH_TICKET = """async (vm) => {
  const r = await fetch(`/v1/vms/${vm}/console-ticket`, { method: "POST", headers: { "x-kasou-csrf": "1" } });
  return { status: r.status, body: await r.json() };
}"""


def follow(api: httpx.Client, job: dict[str, Any], timeout: float = 180) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        j = api.get(f"/v1/jobs/{job['id']}").json()
        if j["state"] in ("succeeded", "failed"):
            return dict(j)
        time.sleep(0.3)
    raise AssertionError(f"job {job['id']} did not finish")


def wait_for(what: str, cond: Any, timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = cond()
        if v:
            return v
        time.sleep(0.3)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def ws_url(base: str, path: str) -> str:
    return "ws://" + base.split("://", 1)[1] + path


def test_operator_console_shows_the_guest_and_takes_keys(
    kasou: Kasou, base: str, root_api: httpx.Client, make_user: Any, page: Any, signin: Any
) -> None:
    r = root_api.post("/v1/vms", json={"name": "con1", "image": "tiny", "vcpus": 1, "memory_mib": 128})
    assert r.status_code == 202, r.text
    assert follow(root_api, r.json()["job"])["state"] == "succeeded"
    make_user("op1", "operator")
    make_user("dr1", "clinician")

    signin("op1")
    page.locator('[data-key="start:con1"]').click(timeout=60_000)  # the VM is listed; start it from the UI
    wait_for("con1 guest ready", lambda: root_api.get("/v1/vms/con1").json()["guest_ready"], 120)
    page.locator('[data-key="console:con1"]').click(timeout=60_000)
    page.wait_for_url("**/ui/console.html?vm=con1", timeout=30_000)
    page.wait_for_selector("body[data-state=drawn]", timeout=60_000)
    marks = page.evaluate("window.kasouConsole")
    assert marks["firstFrameAt"] is not None
    screen = page.locator("#screen canvas")
    time.sleep(1.0)  # the rest of the first screen
    before = screen.screenshot()
    shot(page, "console-before")

    screen.click()
    # keyboard.type() sends no Shift: '>' is Shift+Period on the guest's (US) keyboard, as a person types it.
    page.keyboard.type("echo kasou-typed ", delay=20)
    page.keyboard.press("Shift+Period")
    page.keyboard.type(" /dev/ttyS0", delay=20)
    page.keyboard.press("Enter")
    try:
        wait_for(
            "the typed command in the serial log",
            lambda: "kasou-typed" in root_api.get("/v1/vms/con1/console").text,
            30,
        )
    except AssertionError:
        shot(page, "console-typed")
        api_log = (kasou.paths.logs / "api.log").read_text(errors="replace")[-3000:]
        raise AssertionError(f"state {page.evaluate('document.body.dataset.state')}; api.log: {api_log}") from None
    wait_for("the screen to change", lambda: screen.screenshot() != before, 10)
    shot(page, "console-after")
    events = root_api.get("/v1/events", params={"subject": "vm/con1"}).json()
    assert any(e["kind"] == "console_opened" and "op1" in e["message"] for e in events)

    # A ticket is used once; an expired one connects nothing either.
    t = page.evaluate(FETCH_TICKET, "con1")
    assert t["status"] == 200, t
    first = page.evaluate(WS_PROBE, ws_url(base, t["body"]["url"]))
    assert first["first"] == "RFB 003.008\n", first
    again = page.evaluate(WS_PROBE, ws_url(base, t["body"]["url"]))
    assert again["code"] == 1008 and again["first"] is None, again
    t = page.evaluate(FETCH_TICKET, "con1")
    time.sleep(10.5)
    late = page.evaluate(WS_PROBE, ws_url(base, t["body"]["url"]))
    assert late["code"] == 1008 and late["first"] is None, late

    # Signing out (here from the console page itself) closes the open console.
    page.evaluate("fetch('/v1/auth/logout', { method: 'POST', headers: { 'x-kasou-csrf': '1' } })")
    page.wait_for_selector("body[data-state=closed]", timeout=15_000)

    # A clinician has no right to this VM: no ticket, no websocket without one, a clear message.
    signin("dr1")
    denied = page.evaluate(FETCH_TICKET, "con1")
    assert denied["status"] == 403, denied
    direct = page.evaluate(WS_PROBE, ws_url(base, "/v1/console/ws"))
    assert direct["code"] == 1008 and direct["first"] is None, direct
    page.goto(f"{base}/ui/console.html?vm=con1&lang=en")
    page.wait_for_selector("body[data-state=refused]", timeout=15_000)
    assert "may not open" in page.inner_text("#status")
    shot(page, "console-refused")
