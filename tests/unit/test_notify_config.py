"""The notification settings as read from the environment (:func:`kasou.control.notify.notify_config`): what
works, and a one-line InvalidSetting naming the setting for what does not."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
from pathlib import Path

import pytest

from kasou.control.events import Event, Events, subscribe
from kasou.control.notify import NotifyConfig, channels_of, notify_config
from kasou.control.notify_channels import parse_syslog, sign
from kasou.errors import InvalidSetting
from kasou.store.sqlite import SqliteStore


@pytest.fixture(autouse=True)
def _clean(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for k in list(os.environ):
        if k.startswith("KASOU_NOTIFY_"):
            monkeypatch.delenv(k)


def test_nothing_set_is_no_channel() -> None:
    cfg = notify_config()
    assert cfg == NotifyConfig() and channels_of(cfg) == []


def test_every_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    routes = [{"department": "lab", "mail_to": ["v@lab.example"], "min_severity": "error"},
              {"department": "emr", "webhook": "https://emr.example/hook", "webhook_secret": "x"}]  # fmt: skip
    env = {"WEBHOOK": "https://ops.example/kasou", "WEBHOOK_SECRET": "zq-secret-zq-long-enough", "SMTP_HOST": "mail.example",
           "SMTP_PORT": "587", "SMTP_STARTTLS": "yes", "MAIL_FROM": "kasou@h.example",
           "MAIL_TO": "a@h.example, b@h.example", "SYSLOG": "udp://10.0.0.5:514", "MIN_SEVERITY": "error",
           "ROUTES": json.dumps(routes), "WEBHOOK_ATTEMPTS": "3", "WEBHOOK_BACKOFF": "0.5"}  # fmt: skip
    for k, v in env.items():
        monkeypatch.setenv(f"KASOU_NOTIFY_{k}", v)
    cfg = notify_config()
    assert cfg.mail_to == ["a@h.example", "b@h.example"] and cfg.smtp_port == 587 and cfg.smtp_starttls
    assert cfg.min_severity == "error" and cfg.webhook_attempts == 3 and cfg.webhook_backoff_s == 0.5
    assert "zq-secret-zq" not in repr(cfg) and cfg.webhook_secret == "zq-secret-zq-long-enough"  # secrets are not shown
    chans = {c.name: c.status for c in channels_of(cfg)}
    assert list(chans) == ["mail", "webhook", "syslog", "lab/mail", "emr/webhook"]
    assert chans["lab/mail"].min_severity == "error" and chans["emr/webhook"].min_severity == "error"
    assert chans["emr/webhook"].department == "emr" and chans["mail"].department is None


@pytest.mark.parametrize(
    ("var", "value", "words"),
    [
        ("MIN_SEVERITY", "loud", "KASOU_NOTIFY_MIN_SEVERITY='loud' is not allowed"),
        ("WEBHOOK", "ftp://x", "is no http(s) URL"),
        ("MAIL_TO", "it@h.example", "smtp_host is not"),
        ("SYSLOG", "udp://host", "udp://HOST:PORT, tcp://HOST:PORT or local"),
        ("SMTP_PORT", "70000", "KASOU_NOTIFY_SMTP_PORT"),
        ("ROUTES", "[{", "not JSON"),
        ("ROUTES", '[{"department": "lab"}]', "give mail_to or webhook"),
        (
            "ROUTES",
            '[{"department": "lab", "webhook": "http://x", "color": 1}]',
            "route 1: color: not a field of a route",
        ),
    ],
)
def test_refused(monkeypatch: pytest.MonkeyPatch, var: str, value: str, words: str) -> None:
    monkeypatch.setenv(f"KASOU_NOTIFY_{var}", value)
    with pytest.raises(InvalidSetting) as e:
        notify_config()
    assert words in e.value.message and "\n" not in e.value.message


def test_a_bad_mail_address_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KASOU_NOTIFY_SMTP_HOST", "mail.example")
    monkeypatch.setenv("KASOU_NOTIFY_MAIL_TO", "it@h.example\nBcc: all@h.example")
    with pytest.raises(InvalidSetting, match="is no mail address"):
        notify_config()


def test_syslog_targets_and_signature() -> None:
    assert parse_syslog("local") == ("unix", "/dev/log")
    assert parse_syslog("tcp://[::1]:6514") == ("tcp", ("::1", 6514))
    with pytest.raises(ValueError):
        parse_syslog("udp://h:0")
    # the signature a receiver recomputes: HMAC-SHA256 of the exact body, hex
    assert sign("key", b"{}") == "sha256=" + hmac.new(b"key", b"{}", hashlib.sha256).hexdigest()


def test_the_settings_files_notify_section_reads_as_it_is(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    text = """
[notify]
min_severity = "warning"
smtp_host = "mail.hospital.example"
smtp_starttls = true
smtp_user = "kasou"
smtp_password = "relay password"
mail_to = ["it@hospital.example"]
webhook = "https://alerts.hospital.example/kasou"
webhook_secret = "a long random text, also the receiver's"
webhook_attempts = 3
webhook_backoff = 0.5
syslog = "local"

[[notify.route]]
department = "lab"
mail_to = ["support@lab-vendor.example"]
min_severity = "error"
"""
    (tmp_path / "kasou.toml").write_text(text)
    monkeypatch.setenv("KASOU_CONFIG", str(tmp_path / "kasou.toml"))
    monkeypatch.setenv("KASOU_CONFIG_DIR", str(tmp_path))
    cfg = notify_config()
    assert [r.department for r in cfg.routes] == ["lab"] and cfg.routes[0].min_severity == "error"
    assert cfg.syslog == "local" and cfg.smtp_starttls and cfg.smtp_user == "kasou"
    assert cfg.smtp_password == "relay password" and cfg.webhook_attempts == 3 and cfg.webhook_backoff_s == 0.5


def test_a_listener_that_fails_never_fails_the_emit(tmp_path: Path) -> None:
    async def go() -> None:
        store = SqliteStore(tmp_path / "state.db")
        got: list[str] = []

        def broken(ev: Event) -> None:
            raise RuntimeError("listener bug")

        off = subscribe(store, broken)
        off2 = subscribe(store, lambda ev: got.append(ev.kind))
        await Events(store).emit("host_down", "host/h1", "down", "critical")
        off()
        off2()
        await Events(store).emit("host_up", "host/h1", "up", "info")
        assert got == ["host_down"]
        assert [e.kind for e in await Events(store).list()] == ["host_down", "host_up"]
        await store.close()

    asyncio.run(go())


def test_a_webhooks_shown_target_holds_no_credentials() -> None:
    from kasou.control.notify_channels import WebhookSender

    hook = WebhookSender("https://bot:pw@chat.hospital.example:8443/hooks/kasou?token=abc", None)
    assert hook.target == "https://chat.hospital.example:8443/hooks/kasou"
