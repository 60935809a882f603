"""Notifications from the real ``kasou serve`` process: its host certificate about to expire reaches a webhook
receiver at start-up, and a notification setting it cannot use stops it with one line before it starts."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from kasou import pki
from tests.functional.test_server import free_port, home, serve_api  # noqa: F401 - the fixture
from tests.notify_receivers import wait_for, webhook_receiver

SECRET = "serve-secret-long-enough"


def test_kasou_serve_tells_the_webhook_of_its_expiring_certificate(home: Path) -> None:  # noqa: F811
    tls = home / "tls"
    pki.init_ca(home / "ca")
    pki.issue(home / "ca", "h1", ["127.0.0.1"], [], tls, days=10)
    with webhook_receiver(SECRET) as hook:
        env = {"KASOU_TLS_DIR": str(tls), "KASOU_NOTIFY_WEBHOOK": hook.url, "KASOU_NOTIFY_WEBHOOK_SECRET": SECRET,
               "KASOU_NOTIFY_MIN_SEVERITY": "warning"}  # fmt: skip
        with serve_api(home / "k", **env):
            body = wait_for("the certificate's event", lambda: hook.accepted, timeout=30)[0]
    assert body["event"]["kind"] == "certificate_expiring" and body["event"]["subject"] == "host/h1"
    assert "expires on" in body["event"]["message"] and hook.bad_signatures == 0


def test_kasou_serve_refuses_a_bad_notification_setting(home: Path) -> None:  # noqa: F811
    env = {**os.environ, "KASOU_HOME": str(home), "KASOU_NOTIFY_MIN_SEVERITY": "loud"}
    address = f"127.0.0.1:{free_port()}"
    r = subprocess.run([sys.executable, "-m", "kasou", "serve", "--address", address, "--plain-http"], env=env,
                       capture_output=True, timeout=60)  # fmt: skip
    assert r.returncode != 0
    err = r.stderr.decode().strip()
    assert err.startswith("error: ") and "KASOU_NOTIFY_MIN_SEVERITY" in err and len(err.splitlines()) == 1, err
