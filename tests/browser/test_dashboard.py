"""The operators' dashboard in Debian's real Chromium against kasou running a real tiny guest.

Sign in as an operator through the form, see the VMs, start one from the UI and watch its job's
progress and its state become running, see its CPU chart and its latest restore drill, cancel a confirmation,
switch to English and back; an administrator also sees the audit trail; a clinician who signs in is sent to the portal,
and on the account page changes their password and sets up their TOTP second factor.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest

from kasou.control import totp
from kasou.control.drill import PREFIX as DRILLS
from kasou.store.sqlite import SqliteStore
from tests.browser.conftest import shot, sign_in
from tests.integration.conftest import Kasou
from tests.notify_receivers import webhook_receiver

pytestmark = pytest.mark.qemu


async def put_drill(store: SqliteStore, drill: dict[str, Any]) -> None:
    try:
        await store.put(DRILLS + drill["vm"], drill)
    finally:
        await store.close()


def test_dashboard_start_a_vm_and_watch_it(
    kasou: Kasou, base: str, page: Any, make_user: Callable[..., str], root_api: httpx.Client
) -> None:
    pw_op = make_user("op1", "operator")
    pw_nurse = make_user("nurse1", "clinician")
    pw_admin = make_user("adm1", "admin")
    kasou.run(
        "vm", "create", "emr1", "--image", "tiny", "--vcpus", "1", "--memory", "128", "--disk", "64M", "--tag", "emr"
    )
    # emr1's latest restore drill as `kasou backup drill` records it (a real drill needs a backup server and boots a
    # copy: tests/functional/test_api_backup_server.py and tests/integration/test_ransomware_drill.py run them)
    drill = {"vm": "emr1", "generation": 3, "created": time.time() - 7200, "at": time.time() - 3600, "ok": True,
             "restore_s": 4.2, "boot_s": 2.5, "error": None,
             "check": {"exitcode": 0, "stdout": "1\n", "stderr": "", "seconds": 0.3}}  # fmt: skip
    with ThreadPoolExecutor(1) as pool:  # Playwright runs an event loop in this thread
        pool.submit(asyncio.run, put_drill(SqliteStore(kasou.paths.state_db), drill)).result(timeout=30)
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    requested: list[str] = []
    page.on("request", lambda r: requested.append(r.url))

    sign_in(page, base, "op1", pw_op)
    row = page.locator('#vms tr[data-vm="emr1"]')
    row.wait_for()
    assert row.get_attribute("data-state") == "stopped"
    # The VM list follows GET /v1/vms?watch=true (server-sent events) instead of polling GET /v1/vms.
    page.wait_for_selector('[data-vm-stream="live"]', state="attached", timeout=10_000)
    assert "停止" in row.locator(".vm-state").inner_text()
    assert page.locator("#vms-h").inner_text() == "仮想マシン"
    assert page.locator("#hosts tbody tr[data-host]").count() == 1
    assert "稼働中" in page.locator("#hosts tbody tr[data-host]").inner_text()
    # Its backups: none yet, and its latest restore drill passed (generation, restore and boot times, the check).
    backups = page.locator('#backups tr[data-backup-vm="emr1"]')
    assert page.locator("#backups-h").inner_text() == "バックアップと復元訓練"
    assert "未取得" in backups.inner_text()
    cell = backups.locator(".drill-cell")
    assert cell.locator(".drill").get_attribute("data-ok") == "true" and "合格" in cell.inner_text()
    assert "世代 #3 · 復元 4.2 s · 起動 2.5 s" in cell.inner_text() and "終了コード 0" in cell.inner_text()
    # Its tags, and the list's filters (state, tags)
    assert row.locator(".vm-tags").inner_text() == "emr"
    page.fill("#vm-filter-tag", "ward-a")
    assert page.locator('#vms tr[data-vm="emr1"]').count() == 0
    page.fill("#vm-filter-tag", "emr")
    page.select_option("#vm-filter-state", "running")
    assert page.locator('#vms tr[data-vm="emr1"]').count() == 0
    page.select_option("#vm-filter-state", "")
    row.wait_for()

    # Start it from the UI: the job shows up with its progress, and the VM becomes running.
    t0 = time.monotonic()
    page.click('button[data-act="start"][data-target="emr1"]')
    job = page.locator("#live .job").first
    job.wait_for()
    page.wait_for_selector("#live .job[data-state=succeeded]", timeout=90_000)
    assert "100%" in job.inner_text() and job.get_attribute("data-job")
    page.wait_for_selector('#vms tr[data-vm="emr1"][data-state="running"]', timeout=30_000)
    shown_running = time.monotonic() - t0
    assert "実行中" in row.locator(".vm-state").inner_text()
    assert any(u.endswith(f"/v1/jobs/{job.get_attribute('data-job')}/events") for u in requested)  # SSE, not polling
    assert any("/v1/vms?watch=true" in u for u in requested)  # the state came over the VM stream
    assert sum(u.endswith("/v1/vms") for u in requested) <= 2, requested  # the first refresh only, not every 5 s

    # A CPU chart appears once the collector has two samples of the VM (5 s apart).
    page.wait_for_selector('#vms tr[data-vm="emr1"] svg.spark polyline', timeout=60_000)
    assert "CPU" in (row.locator("svg.spark").get_attribute("aria-label") or "")
    assert page.locator("#hosts svg.spark polyline").count() == 1
    shot(page, "dashboard-ja")

    # The real QEMU's figures behind the chart: CPU and RSS from /proc, disk I/O from QMP, user networking uncounted.
    (vm,) = root_api.get("/v1/metrics").json()["hosts"][kasou.json("host", "list")[0]["name"]]["vms"]
    assert vm["name"] == "emr1" and vm["cpu_seconds"] > 0 and vm["rss_bytes"] > 32 * 1024 * 1024
    assert vm["disks"] and vm["disks"][0]["read_bytes"] > 0 and vm["disks"][0]["write_ops"] > 0, vm
    assert all(not n["counted"] for n in vm["nics"])  # the tiny VM's NIC is on QEMU user networking
    assert not vm["nics"] or "user networking" in (vm["note"] or "")
    t1 = time.monotonic()
    prom = root_api.get("/metrics").text
    print(f"\nGET /metrics with one real VM: {(time.monotonic() - t1) * 1000:.0f} ms, {len(prom)} bytes")
    assert 'kasou_vm_cpu_seconds_total{vm="emr1"' in prom and "kasou_vm_disk_write_bytes_total{" in prom

    # Graceful shutdown asks first (reached with the keyboard); Escape cancels and nothing happens.
    page.locator('button[data-act="shutdown"][data-target="emr1"]').focus()
    page.keyboard.press("Enter")
    page.wait_for_selector("#confirm[open]")
    page.keyboard.press("Escape")
    page.wait_for_selector("#confirm:not([open])", state="attached")
    assert row.get_attribute("data-state") == "running"

    # English and back.
    page.click("#lang")
    page.wait_for_function("() => document.querySelector('#vms-h')?.textContent === 'Virtual machines'")
    assert "Running" in page.locator('#vms tr[data-vm="emr1"] .vm-state').inner_text()
    drill_en = page.locator('#backups tr[data-backup-vm="emr1"] .drill-cell').inner_text()
    assert "Passed" in drill_en and "check exited 0" in drill_en, drill_en
    shot(page, "dashboard-en")
    page.click("#lang")
    page.wait_for_function("() => document.querySelector('#vms-h')?.textContent === '仮想マシン'")
    assert errors == [], errors
    print(f"\nstart clicked -> state running shown: {shown_running:.1f} s")

    assert page.locator("#audit-card").is_hidden()  # an operator does not read the audit trail

    # An administrator also sees the latest audit records (the operator's start is one of them).
    page.click("#signout")
    page.wait_for_selector("#signin:not([hidden])")
    sign_in(page, base, "adm1", pw_admin)
    page.wait_for_selector("#audit-card:not([hidden]) #audit tbody tr[data-seq]")
    assert "/v1/vms/emr1/actions/start" in page.locator("#audit").inner_text()

    # Sign out; a clinician who signs in is sent to the desktop portal.
    page.click("#signout")
    page.wait_for_selector("#signin:not([hidden])")
    sign_in(page, base, "nurse1", pw_nurse)
    page.wait_for_url("**/ui/portal.html*", timeout=30_000)

    # The clinician changes their own password and sets up their own second factor on the account page.
    new_pw = "a-new-password-2026"
    page.click("#account")
    page.wait_for_url("**/ui/account.html*", timeout=30_000)
    page.wait_for_function("() => document.getElementById('totp-state').textContent.length > 0")
    assert page.locator("#back").get_attribute("href") == "/ui/portal.html"
    page.fill("#current", pw_nurse)
    page.fill("#new1", new_pw)
    page.fill("#new2", new_pw)
    page.click("#password-form button[type=submit]")
    page.wait_for_selector("#password-result.ok")
    page.fill("#totp-password", new_pw)
    page.click("#totp-start button[type=submit]")
    page.wait_for_selector("#totp-confirm:not([hidden])")
    secret = page.locator("#totp-secret").inner_text().replace(" ", "")
    assert f"secret={secret}" in page.locator("#totp-uri").inner_text()
    page.fill("#totp-code", totp.code_at(secret, time.time()))
    page.click("#totp-confirm button[type=submit]")
    page.wait_for_selector("#totp-result.ok")
    shot(page, "account-ja")
    assert errors == [], errors
    assert (
        root_api.get("/v1/users").json()
        and next(u for u in root_api.get("/v1/users").json() if u["name"] == "nurse1")["totp"] is True
    )
    # Signing in now needs the new password and a code: the form asks for the code.
    r = httpx.post(f"{base}/v1/auth/login", json={"name": "nurse1", "password": pw_nurse})
    assert r.status_code == 401
    r = httpx.post(f"{base}/v1/auth/login", json={"name": "nurse1", "password": new_pw})
    assert r.status_code == 401 and r.json()["details"]["totp"] == "required"


def test_the_japanese_labels_are_drawn_in_a_japanese_font(page: Any, base: str) -> None:
    """Without a CJK font every Japanese label is a row of empty boxes (each as wide as a glyph, so a width alone
    cannot tell): the browser says which font drew the label, and it is a CJK one, for every character."""
    page.goto(f"{base}/ui/?lang=ja")
    label = page.locator("#signin h2")
    label.wait_for()
    text = label.inner_text()
    assert text == "サインイン", text
    cdp = page.context.new_cdp_session(page)
    try:
        cdp.send("DOM.enable")
        cdp.send("CSS.enable")
        root = cdp.send("DOM.getDocument")["root"]["nodeId"]
        node = cdp.send("DOM.querySelector", {"nodeId": root, "selector": "#signin h2"})["nodeId"]
        fonts = cdp.send("CSS.getPlatformFontsForNode", {"nodeId": node})["fonts"]
    finally:
        cdp.detach()
    cjk = [f for f in fonts if "CJK" in f["familyName"] or "IPA" in f["familyName"]]
    assert cjk and sum(f["glyphCount"] for f in cjk) == len(text), fonts
    # And the label is as wide as its glyphs: full-width kana are one em each.
    width, size = page.evaluate(
        "() => { const e = document.querySelector('#signin h2'); const r = document.createRange();"
        " r.selectNodeContents(e); return [r.getBoundingClientRect().width, parseFloat(getComputedStyle(e).fontSize)]; }"
    )
    assert 0.9 * len(text) * size <= width <= 1.1 * len(text) * size, (width, size, fonts)


def test_the_balancer_and_the_notification_channels_on_the_dashboard(
    kasou: Kasou, base: str, page: Any, make_user: Callable[..., str]
) -> None:
    """kasou started with a webhook: an administrator sees the channel, sends a test event (the receiver gets it,
    signed) and sees it delivered; asks the balancer for its recommendations (one host: nothing to move) and turns
    it to recommend mode; an auditor sees both cards and can change neither."""
    secret = "dashboard-webhook-secret"
    with webhook_receiver(secret) as hook:
        kasou.env.update(KASOU_NOTIFY_WEBHOOK=hook.url, KASOU_NOTIFY_WEBHOOK_SECRET=secret)
        kasou.run("down", timeout=60)
        kasou.run("up", timeout=120)
        pw_admin = make_user("adm2", "admin")
        pw_auditor = make_user("aud1", "auditor")
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        sign_in(page, base, "adm2", pw_admin)
        channel = page.locator("#notify-channels tbody tr[data-channel]")
        channel.first.wait_for()
        assert page.locator("#notify-h").inner_text().startswith("通知")
        assert channel.count() == 1 and "Webhook" in channel.inner_text() and "127.0.0.1" in channel.inner_text()
        page.click("#ntf-test")
        result = page.locator("#ntf-test-results tbody tr[data-outcome]")
        result.first.wait_for(timeout=30_000)
        assert result.get_attribute("data-outcome") == "delivered", result.inner_text()
        assert "配信済み" in result.inner_text()
        assert hook.kinds() == ["notify_test"] and hook.bad_signatures == 0
        page.wait_for_function(
            "() => document.querySelector('#notify-channels tbody tr')?.textContent.includes('1 / 0')"
        )

        # The balancer: its recommendations on one host, then recommend mode saved.
        page.click("#bal-recommend")
        page.locator("#bal-hosts tbody tr[data-host]").first.wait_for()
        assert page.locator("#bal-moves tbody tr[data-move]").count() == 0
        assert page.locator("#bal-run").is_hidden() and page.locator(".bal-summary").inner_text()
        page.select_option("#bal-mode", "recommend")
        page.fill("#bal-threshold", "25")
        page.click("#bal-save")
        page.wait_for_selector('#balance-card[data-saved="recommend"]')
        settings = kasou.json("cluster", "balance-settings")
        assert (settings["mode"], settings["threshold"]) == ("recommend", 25.0), settings
        page.locator("#balance-card").scroll_into_view_if_needed()
        shot(page, "dashboard-ops-ja")

        page.click("#signout")
        page.wait_for_selector("#signin:not([hidden])")
        sign_in(page, base, "aud1", pw_auditor)
        page.wait_for_selector('#balance-card[data-mode="recommend"]')
        assert page.locator("#bal-threshold").input_value() == "25"
        assert page.locator("#bal-save").is_disabled() and page.locator("#bal-recommend").is_hidden()
        assert page.locator("#ntf-test").is_hidden() and page.locator("#notify-channels tbody tr").count() == 1
        assert errors == [], errors
