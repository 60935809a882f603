"""Certificates that will expire are events: short-lived certificates made with kasou's own CA functions, raised
once per certificate and level (warning at 30 days, error at 7), cleared when renewed; and at start-up of the
API server the check runs and its event reaches a webhook."""

from __future__ import annotations

import asyncio
from pathlib import Path

from kasou import pki
from kasou.config import TlsFiles
from kasou.control.certwatch import CertWatch, level
from kasou.control.events import Event, Events
from kasou.control.notify import NotifyConfig
from kasou.store.sqlite import SqliteStore
from tests.functional.test_notify import SECRET, kasou
from tests.notify_receivers import wait_for, webhook_receiver


def files(d: Path) -> TlsFiles:
    return TlsFiles(ca=d / "ca.crt", cert=d / "host.crt", key=d / "host.key")


async def _events(store: SqliteStore) -> list[Event]:
    return await Events(store).list()


def test_levels() -> None:
    assert level(31) is None and level(30) == "warning" and level(7.5) == "warning"
    assert level(7) == "error" and level(-2) == "error"


def test_host_certificate_expiring_raised_once_then_cleared_when_renewed(tmp_path: Path) -> None:
    ca, host = tmp_path / "ca", tmp_path / "tls"
    pki.init_ca(ca)  # ten years
    pki.issue(ca, "h1", ["127.0.0.1"], [], host, days=5)

    async def go() -> None:
        store = SqliteStore(tmp_path / "state.db")
        watch = CertWatch(store, files(host), host="h1")
        raised = await watch.check()
        assert raised == ["cert/host/h1/warning", "cert/host/h1/error"]
        evs = await _events(store)
        assert [(e.kind, e.subject, e.severity) for e in evs] == [
            ("certificate_expiring", "host/h1", "warning"),
            ("certificate_expiring", "host/h1", "error"),
        ]
        assert "host h1's certificate" in evs[0].message and "in 4 days" in evs[0].message
        await watch.check()  # still expiring: nothing new
        assert len(await _events(store)) == 2
        pki.issue(ca, "h1", ["127.0.0.1"], [], host, days=400)  # renewed
        assert await watch.check() == []
        evs = await _events(store)
        assert [(e.kind, e.severity) for e in evs[2:]] == [("certificate_renewed", "info")]
        assert await Events(store).active_keys("cert/") == []
        await store.close()

    asyncio.run(go())


def test_site_ca_expiring_is_a_warning_and_a_replaced_ca_clears_it(tmp_path: Path) -> None:
    ca, host = tmp_path / "ca", tmp_path / "tls"
    pki.init_ca(ca, days=20)
    pki.issue(ca, "h1", [], [], host, days=400)  # capped at the CA's own 20 days

    async def go() -> None:
        store = SqliteStore(tmp_path / "state.db")
        watch = CertWatch(store, files(host), host="h1")
        raised = await watch.check()
        assert len(raised) == 2 and raised[0].startswith("cert/ca/") and raised[1] == "cert/host/h1/warning"
        site = [e for e in await _events(store) if e.subject == "site"]
        assert len(site) == 1 and site[0].severity == "warning" and "the site CA" in site[0].message
        # a new CA (another name) and a new host certificate: both conditions end
        new_ca = tmp_path / "ca2"
        pki.init_ca(new_ca, site="hospital site 2")
        pki.issue(new_ca, "h1", [], [], host, days=400)
        assert await watch.check() == []
        assert await Events(store).active_keys("cert/") == []
        await store.close()

    asyncio.run(go())


def test_missing_files_are_no_event(tmp_path: Path) -> None:
    async def go() -> None:
        store = SqliteStore(tmp_path / "state.db")
        assert await CertWatch(store, files(tmp_path / "none"), host="h1").check() == []
        assert await CertWatch(store, None, host="h1").check() == []
        await store.close()

    asyncio.run(go())


def test_the_api_server_checks_at_start_and_tells_the_webhook(tmp_path: Path) -> None:
    ca, host = tmp_path / "ca", tmp_path / "tls"
    pki.init_ca(ca)
    pki.issue(ca, "h1", [], [], host, days=3)
    with webhook_receiver(SECRET) as hook:
        cfg = NotifyConfig(webhook=hook.url, webhook_secret=SECRET, min_severity="error")
        with kasou(tmp_path, cfg, tls=files(host)):
            body = wait_for("the certificate's event", lambda: hook.accepted)[0]
            assert body["event"]["kind"] == "certificate_expiring" and body["event"]["severity"] == "error"
