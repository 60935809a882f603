"""The desktop portal in Debian's real Chromium against kasou running real tiny guests.

A pool of 2 desktops (linked clones of a template made of a tiny VM), 1 kept pre-started. A
clinician signs in through the form, lands on the portal, presses "open my desktop" and gets the
pre-started desktop with a link to its console. A file written in the session (on the guest's disk,
through its serial console) is gone after sign-out: the desktop was reset to the template.
"""

from __future__ import annotations

import contextlib
import re
import socket
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from tests.browser.conftest import shot
from tests.integration.conftest import Kasou

pytestmark = pytest.mark.qemu

SECRET = "patient-record-4711"


def _wait(what: str, cond: Callable[[], Any], timeout: float = 120) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = cond()
        if v:
            return v
        time.sleep(0.3)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def _job(api: httpx.Client, job: dict[str, Any], timeout: float = 180) -> dict[str, Any]:
    done = _wait(f"job {job['id']}", lambda: (j := api.get(f"/v1/jobs/{job['id']}").json())["state"]
                 in ("succeeded", "failed") and j, timeout)  # fmt: skip
    assert done["state"] == "succeeded", done
    return dict(done)


def _desktop(api: httpx.Client, vm: str) -> dict[str, Any]:
    p = api.get(f"/v1/desktop-pools/{vm.rsplit('-', 1)[0]}").json()
    return dict(next(d for d in p["desktops"] if d["vm"] == vm))


def type_line(k: Kasou, vm: str, line: str, expect: str, timeout: float = 60) -> str:
    """Type one line on the guest's serial console; the console output after it up to ``expect`` (a regex)."""
    log = k.paths.logs / "serial" / f"{vm}.log"

    def text() -> str:
        try:
            return log.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    start = len(text())
    deadline = time.monotonic() + timeout
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(str(k.paths.vm_run / vm / "serial.sock"))
        s.sendall(line.encode() + b"\n")
        s.settimeout(0.25)
        while not (found := re.search(expect, text()[start:])):
            if time.monotonic() > deadline:
                raise AssertionError(f"no {expect!r} on the console of {vm}: {text()[start:][-2000:]}")
            with contextlib.suppress(TimeoutError):
                if not s.recv(65536):
                    time.sleep(0.25)
    return text()[start : start + found.end()]


def test_portal_desktop_is_reset_after_sign_out(
    kasou: Kasou, base: str, root_api: httpx.Client, make_user: Callable[..., str], page: Any, signin: Any
) -> None:
    r = root_api.post("/v1/vms", json={"name": "deskbase", "image": "tiny", "vcpus": 1, "memory_mib": 128})
    _job(root_api, r.json()["job"])
    assert root_api.post("/v1/vms/deskbase/template").json()["state"] == "template"
    r = root_api.post("/v1/desktop-pools", json={"name": "ward", "template": "deskbase", "size": 2, "prestart": 1,
                                                 "description": "病棟 3 / Ward 3"})  # fmt: skip
    assert r.status_code == 202, r.text
    _job(root_api, r.json()["job"])
    _wait("a pre-started desktop", lambda: root_api.get("/v1/desktop-pools/ward").json()["free_ready"] >= 1)
    make_user("nurse1", "clinician", ["ward"])

    signin("nurse1")
    page.wait_for_url(re.compile(r"/ui/portal\.html"))
    button = page.locator("section[data-pool=ward] button.open")
    assert button.inner_text() == "デスクトップを開く"
    t0 = time.monotonic()
    button.click()
    status = page.locator("section[data-pool=ward] .status.ready")
    status.wait_for(timeout=60_000)
    ready_s = time.monotonic() - t0
    vm = status.get_attribute("data-vm")
    assert vm == "ward-01"  # the pre-started one
    assert page.locator("section[data-pool=ward] a.screen").get_attribute("href") == f"/ui/console.html?vm={vm}"
    shot(page, "portal-desktop-ready")
    assert ready_s < 10, f"a pre-started desktop took {ready_s:.1f} s"

    # The session writes a file on the desktop's disk.
    out = type_line(kasou, vm, f"echo {SECRET} > /data/note.txt; sync; cat /data/note.txt; echo WROTE-$((6*7))",
                    r"WROTE-42")  # fmt: skip
    assert SECRET in out

    page.click("#signout")
    page.wait_for_url(re.compile(r"/ui/(\?.*)?$"))
    _wait("the desktop reset and back in the pool", lambda: _desktop(root_api, vm)["state"] == "free", 120)
    assert _desktop(root_api, vm)["user"] is None
    # The other desktop is pre-started now; start this one to look inside it.
    if root_api.get(f"/v1/vms/{vm}").json()["state"] != "running":
        _job(root_api, root_api.post(f"/v1/vms/{vm}/actions/start").json()["job"])
    _wait(f"{vm} ready again", lambda: root_api.get(f"/v1/vms/{vm}").json()["guest_ready"], 120)
    out = type_line(kasou, vm, "cat /data/note.txt; echo LOOKED-$((6*7))", r"LOOKED-42")
    assert SECRET not in out, out
    r = root_api.delete("/v1/desktop-pools/ward", params={"force": True})
    _job(root_api, r.json()["job"])
    assert [v["name"] for v in root_api.get("/v1/vms").json()] == ["deskbase"]
