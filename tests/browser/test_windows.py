"""The maintenance windows' card in Debian's real Chromium against a real kasou: a vendor of the lab requests a window
for the lab's VM through the form, the lab's manager approves it with the card's button, and both see its state change;
the report link opens the window's report."""

from __future__ import annotations

import time
from typing import Any

import httpx
import pytest

from tests.browser.conftest import PASSWORD, shot, sign_in
from tests.integration.conftest import Kasou

pytestmark = pytest.mark.qemu


def test_request_a_window_as_a_vendor_and_approve_it_as_the_manager(
    kasou: Kasou, base: str, page: Any, root_api: httpx.Client
) -> None:
    t0 = time.monotonic()
    for name, role in (("v1", "vendor"), ("chief", "manager")):
        body = {"name": name, "role": role, "password": PASSWORD, "departments": ["lab"]}
        assert root_api.post("/v1/users", json=body).status_code == 201
    kasou.run("vm", "create", "lab1", "--image", "tiny", "--vcpus", "1", "--memory", "128", "--disk", "64M",
              "--department", "lab")  # fmt: skip
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))

    # The vendor requests a window with the form (in Japanese).
    sign_in(page, base, "v1", PASSWORD, lang="ja")
    page.locator("#windows-card").wait_for()
    assert page.locator("#windows-h").inner_text().startswith("保守作業ウィンドウ")
    assert page.locator("#mw-vendor").input_value() == "v1"
    page.click("#mw-request summary")
    page.fill("#mw-vms", "lab1")
    page.fill("#mw-plan", "replace the lab DB's index <b>now</b>")
    page.click("#mw-submit")
    row = page.locator("#windows tbody tr[data-window]")
    row.wait_for()
    wid = row.get_attribute("data-window")
    assert row.get_attribute("data-state") == "requested" and "申請中" in row.inner_text()
    assert "<b>now</b>" in row.locator(".mw-plan").inner_text()  # shown as text, not markup
    assert page.locator(f'button[data-mw="approve"][data-id="{wid}"]').count() == 0  # a vendor does not approve
    shot(page, "windows-requested")

    # The vendor signs out; the lab's manager signs in (in English), approves it and sees the state change.
    page.click("#signout")
    page.locator("#signin").wait_for()
    sign_in(page, base, "chief", PASSWORD, lang="en")
    mrow = page.locator(f'#windows tr[data-window="{wid}"]')
    mrow.wait_for()
    assert "Requested" in mrow.inner_text()
    page.click(f'button[data-mw="approve"][data-id="{wid}"]')
    page.wait_for_selector(f'#windows tr[data-window="{wid}"][data-state="active"]', timeout=15_000)
    assert "Active" in mrow.inner_text() and "chief" in mrow.inner_text()
    assert page.locator(f'button[data-mw="revoke"][data-id="{wid}"]').count() == 1
    shot(page, "windows-approved")
    # Its report: the plan, nothing done yet.
    page.click(f'a[href="/ui/window-report.html?id={wid}"]')
    page.wait_for_selector("#mw-actions")
    assert page.locator("#mw-id").inner_text() == wid
    assert "replace the lab DB's index" in page.locator("pre.mw-plan").inner_text()
    assert root_api.get(f"/v1/maintenance-windows/{wid}").json()["decided_by"] == "chief"
    assert not errors, errors
    print(f"window requested and approved through the UI in {time.monotonic() - t0:.1f} s")
