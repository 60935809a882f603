"""A recorded console session replays in Debian's real Chromium: an operator uses a real tiny guest's console
(recorded by the API's proxy), then an auditor finds the recording in the list, opens the replay page, and
noVNC draws the guest's screen from the recording while the time bar moves; seeking back replays from the
start; the replay is audited."""

from __future__ import annotations

import time
from typing import Any

import httpx
import pytest

from tests.browser.conftest import shot
from tests.browser.test_console import follow, wait_for
from tests.integration.conftest import Kasou

pytestmark = pytest.mark.qemu

NON_BLANK = """() => {
  const c = document.querySelector('#screen canvas');
  if (!c || !c.width || !c.height) return 0;
  const px = c.getContext('2d', { willReadFrequently: true }).getImageData(0, 0, c.width, c.height).data;
  let n = 0;
  for (let i = 0; i < px.length; i += 4) if (px[i] || px[i + 1] || px[i + 2]) n++;
  return n;
}"""


def test_a_recorded_console_session_replays(
    kasou: Kasou, base: str, root_api: httpx.Client, make_user: Any, page: Any, signin: Any
) -> None:
    body = {"name": "rec1", "image": "tiny", "vcpus": 1, "memory_mib": 128, "start": True}
    r = root_api.post("/v1/vms", json=body)
    assert r.status_code == 202, r.text
    assert follow(root_api, r.json()["job"])["state"] == "succeeded"
    wait_for("rec1 guest ready", lambda: root_api.get("/v1/vms/rec1").json()["guest_ready"], 120)
    make_user("op1", "operator")
    make_user("aud1", "auditor")

    signin("op1", lang="en")
    page.goto(f"{base}/ui/console.html?vm=rec1&lang=en")
    page.wait_for_selector("body[data-state=drawn]", timeout=60_000)
    page.locator("#screen canvas").click()
    page.keyboard.type("echo replayed", delay=30)
    page.keyboard.press("Enter")
    time.sleep(2.0)  # a few seconds of screen
    page.evaluate("fetch('/v1/auth/logout', { method: 'POST', headers: { 'x-kasou-csrf': '1' } })")
    page.wait_for_selector("body[data-state=closed]", timeout=15_000)
    recs = wait_for("the recording", lambda: [m for m in root_api.get("/v1/recordings").json()
                                              if m["state"] == "complete"], 15)  # fmt: skip
    [m] = recs
    assert (m["vm"], m["user"], m["kind"]) == ("rec1", "op1", "vnc") and m["size"] > 1000

    signin("aud1", lang="en")
    assert page.locator("#recordings").is_visible()  # the dashboard links to the recordings for auditors
    page.locator("#recordings").click()
    link = page.locator(f'[data-key="replay:{m["id"]}"]')
    link.click(timeout=30_000)
    page.wait_for_url(f"**/ui/replay.html?id={m['id']}", timeout=30_000)
    page.wait_for_selector("body[data-state=playing]", timeout=30_000)
    wait_for("the guest's screen on the canvas", lambda: page.evaluate(NON_BLANK) > 100, 30)
    first = page.evaluate("window.kasouReplay.position")
    wait_for("the time bar to move", lambda: float(page.locator("#seek").input_value()) > first + 200, 15)
    shot(page, "replay-playing")
    state = page.evaluate("window.kasouReplay")
    assert state["duration"] > 1000 and state["fed"] > 0, state

    # Seek back to the start and forward again at 8x: the screen is drawn again from the start.
    page.select_option("#speed", "8")
    before = page.evaluate("window.kasouReplay.position")
    page.evaluate("(() => { const s = document.querySelector('#seek'); s.value = '0';"
                  " s.dispatchEvent(new Event('input')); })()")  # fmt: skip
    assert page.evaluate("window.kasouReplay.position") < min(before, 1000)
    page.wait_for_selector("body[data-state=ended]", timeout=60_000)
    assert page.evaluate(NON_BLANK) > 100
    assert page.locator("#time").inner_text().split(" / ")[0] == page.locator("#time").inner_text().split(" / ")[1]

    replays = root_api.get("/v1/audit/records", params={"action": "console_recording_replay"}).json()
    assert any(x["actor"]["name"] == "aud1" and x["details"]["recording"] == m["id"] for x in replays)
    # An operator may not replay it.
    page.evaluate("fetch('/v1/auth/logout', { method: 'POST', headers: { 'x-kasou-csrf': '1' } })")
    signin("op1", lang="en")
    page.goto(f"{base}/ui/replay.html?id={m['id']}&lang=en")
    page.wait_for_selector("body[data-state=refused]", timeout=15_000)
