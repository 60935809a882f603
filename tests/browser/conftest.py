"""Browser tests: Debian's real Chromium, driven by Playwright's Python package, against a real kasou.

Fixtures (import nothing; pytest finds them here):

* ``kasou`` — a running kasou with its own KASOU_HOME and API port (tests/integration/conftest.py);
* ``base`` — its URL, e.g. ``http://127.0.0.1:41234``;
* ``root_api`` — an httpx client of its API with the root token;
* ``make_user(name, role, pools=())`` — a user made through the API; returns its password;
* ``browser_context`` / ``page`` — Chromium (headless, fresh profile, 1280x800), closed at the end;
  any Chromium left with this test's profile is killed by pid;
* ``sign_in(page, base, user, password, lang="ja")`` — signs in through the real form at ``/ui/``.

Mark test modules ``pytestmark = pytest.mark.qemu`` (they need root, the tiny image and Chromium)
and run them under the machine lock: ``flock /tmp/kasou-qemu.lock .venv/bin/pytest tests/browser/...``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.integration.conftest import Kasou, kasou, pid_alive, tiny_image  # noqa: F401  (fixtures)

CHROMIUM = os.environ.get("KASOU_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
    "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
]  # fmt: skip
VIEWPORT = {"width": 1280, "height": 800}
PASSWORD = "correct-horse-battery"  # every test user's password (10+ characters)
SHOTS = Path(os.environ.get("KASOU_TEST_SHOTS", "/tmp/kasou-shots"))


@pytest.fixture
def base(kasou: Kasou) -> str:  # noqa: F811
    return f"http://{kasou.api}"


@pytest.fixture
def root_api(kasou: Kasou, base: str) -> Iterator[httpx.Client]:  # noqa: F811
    token = kasou.paths.token_file.read_text().strip()
    with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {token}"}, timeout=60) as c:
        yield c


@pytest.fixture
def make_user(root_api: httpx.Client) -> Callable[..., str]:
    def make(name: str, role: str, pools: tuple[str, ...] | list[str] = ()) -> str:
        body = {"name": name, "role": role, "password": PASSWORD, "pools": list(pools)}
        r = root_api.post("/v1/users", json=body)
        assert r.status_code == 201, r.text
        return PASSWORD

    return make


def chromium_pids(profile: Path) -> list[int]:
    """Chromium processes started with this profile directory."""
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            args = (d / "cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if "chrom" in args and str(profile) in args:
            out.append(int(d.name))
    return out


@pytest.fixture
def browser_context() -> Iterator[Any]:
    """A Chromium of its own (headless, fresh profile), as a Playwright BrowserContext."""
    if not Path(CHROMIUM).exists():
        pytest.skip(f"Debian's chromium is not installed ({CHROMIUM})")
    sync_api = pytest.importorskip("playwright.sync_api")
    profile = Path(tempfile.mkdtemp(prefix="kasou-chromium-", dir="/tmp"))
    pw = sync_api.sync_playwright().start()
    try:
        ctx = pw.chromium.launch_persistent_context(
            str(profile), executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS, viewport=VIEWPORT,
            timeout=60_000, locale="ja-JP",
        )  # fmt: skip
        ctx.set_default_timeout(30_000)
        try:
            yield ctx
        finally:
            ctx.close()
    finally:
        pw.stop()
        for pid in chromium_pids(profile):
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while any(pid_alive(p) for p in chromium_pids(profile)) and time.monotonic() < deadline:
            time.sleep(0.05)
        shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture
def page(browser_context: Any) -> Iterator[Any]:
    """The context's first page (1280x800). The test fails if any page of the context reports a
    Content-Security-Policy violation (kasou.web's headers must leave the UI and noVNC working)."""
    violations: list[str] = []

    def note(msg: Any) -> None:
        if "Content Security Policy" in msg.text or "Content-Security-Policy" in msg.text:
            violations.append(msg.text)

    browser_context.on("console", note)
    pages = browser_context.pages
    yield pages[0] if pages else browser_context.new_page()
    assert not violations, violations


def sign_in(page: Any, base: str, user: str, password: str = PASSWORD, lang: str = "ja") -> None:
    """Sign in through the real form at /ui/ and wait until the form is gone (dashboard or portal)."""
    page.goto(f"{base}/ui/?lang={lang}")
    page.fill("#user", user)
    page.fill("#password", password)
    page.click("#signin button[type=submit]")
    page.wait_for_function(
        "() => location.pathname !== '/ui/' || !document.getElementById('signout').hidden",
        timeout=30_000,
    )


def shot(page: Any, name: str) -> Path:
    """A screenshot kept for a person to look at (KASOU_TEST_SHOTS, default /tmp/kasou-shots)."""
    SHOTS.mkdir(parents=True, exist_ok=True)
    path = SHOTS / f"{name}.png"
    page.screenshot(path=str(path))
    return path


@pytest.fixture
def signin(page: Any, base: str) -> Callable[..., Any]:
    """``signin(user, password=PASSWORD, lang="ja")`` on this test's page; returns the page."""

    def go(user: str, password: str = PASSWORD, lang: str = "ja") -> Any:
        sign_in(page, base, user, password, lang)
        return page

    return go
