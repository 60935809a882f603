"""Notifications with real receivers: a mail server (aiosmtpd), a webhook receiver that checks the signature and
fails its first requests, a syslog socket; routing by department and severity; a hung receiver never holds up
an emit; ``kasou notify test`` and ``status`` through the CLI."""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from kasou.agent.app import Agent, create_agent_app
from kasou.agent.client import AgentClient
from kasou.agent.storage import LocalDisks
from kasou.api.app import create_app
from kasou.api.client import Client
from kasou.api.deps import Services
from kasou.cli import common
from kasou.cli import main as cli
from kasou.config import TlsFiles
from kasou.control.events import Severity
from kasou.control.hosts import Agents
from kasou.control.notify import NotifyConfig, NotifyRoute
from kasou.control.notify_channels import sign
from kasou.control.records import VMRecord, vm_key
from kasou.store.sqlite import SqliteStore
from tests.doubles.driver import FakeDriver
from tests.functional.conftest import TOKEN, Env, make_fake_image
from tests.notify_receivers import mail_server, silent_receiver, udp_syslog, wait_for, webhook_receiver

SECRET = "s3cret-of-the-site"


@contextmanager
def kasou(tmp: Path, cfg: NotifyConfig, tls: TlsFiles | None = None) -> Iterator[Env]:
    """A whole kasou in one process (as tests/functional/conftest.py's env) with these notification settings."""
    images = tmp / "images"
    make_fake_image(images)
    driver = FakeDriver()
    agent = Agent(host="host1", driver=driver, disks=LocalDisks(tmp / "disks", images), accelerator="tcg",
                  accelerator_reason="test", qemu_version="7.2", images=lambda: ["tiny"])  # fmt: skip
    agent_client = AgentClient("host1", transport=httpx.ASGITransport(app=create_agent_app(agent)))
    holder: dict[str, Services] = {}

    async def factory() -> Services:
        store = SqliteStore(tmp / "state.db")
        holder["svc"] = Services.build(store, Agents({"host1": agent_client}), shutdown_timeout=2, notify=cfg, tls=tls)
        return holder["svc"]

    with TestClient(create_app(factory, TOKEN), headers={"Authorization": f"Bearer {TOKEN}"}) as api:
        yield Env(api, driver, holder["svc"], tmp, agent)


def call(env: Env, fn: Callable[..., Awaitable[Any]], *args: Any) -> Any:
    """Run ``fn`` in the app's event loop (where its services live)."""
    assert env.api.portal is not None
    return env.api.portal.call(fn, *args)


def emit(env: Env, kind: str, subject: str, severity: Severity = "warning", message: str = "") -> None:
    call(env, env.services.vms.events.emit, kind, subject, message or f"{kind} of {subject}", severity)


def put_vm(env: Env, name: str, department: str | None) -> None:
    """A VM record of ``department`` (what routing looks up), without a job."""
    rec = {"name": name, "uuid": f"00000000-0000-4000-8000-{abs(hash(name)) % 10**12:012d}", "vcpus": 1,
           "memory_mib": 128, "state": "stopped", "department": department}  # fmt: skip
    call(env, env.services.store.put, vm_key(name), VMRecord.model_validate(rec).model_dump(mode="json"))


def test_mail_webhook_and_syslog_get_an_event_the_webhook_after_retries(tmp_path: Path) -> None:
    with mail_server() as smtp, webhook_receiver(SECRET, fail_first=2) as hook, udp_syslog() as (target, read):
        cfg = NotifyConfig(smtp_host="127.0.0.1", smtp_port=smtp.port, mail_from="kasou@hospital.example",
                           mail_to=["it@hospital.example"], webhook=hook.url, webhook_secret=SECRET,
                           webhook_backoff_s=0.05, syslog=target, min_severity="warning")  # fmt: skip
        with kasou(tmp_path, cfg) as env:
            emit(env, "pool_low_space", "pool/fast", "error", "pool fast has 3% free")
            mail = wait_for("the mail", lambda: smtp.to("it@hospital.example"))[0]
            assert mail.mail_from == "kasou@hospital.example"
            assert mail.message["Subject"] == "[kasou error] pool_low_space pool/fast"
            assert "pool fast has 3% free" in mail.message.get_payload()
            body = wait_for("the webhook", lambda: hook.accepted)[0]
            assert len(hook.requests) == 3  # two 503 answers, then delivered
            assert hook.bad_signatures == 0
            assert body["event"]["kind"] == "pool_low_space" and body["event"]["severity"] == "error"
            assert body["host"] and body["department"] is None and body["test"] is False
            last = hook.requests[-1]
            assert last["headers"]["X-Kasou-Signature"] == sign(SECRET, last["body"])
            assert abs(int(last["headers"]["X-Kasou-Timestamp"]) - time.time()) < 60
            assert json.loads(last["body"])["timestamp"] == int(last["headers"]["X-Kasou-Timestamp"])
            lines = read(5.0)
            assert len(lines) == 1
            line = lines[0].decode()
            assert line.startswith("<27>1 ")  # daemon (3) * 8 + error (3); RFC 5424 version 1
            assert " kasou " in line and " event - " in line
            assert json.loads(line.split(" event - ", 1)[1])["event"]["subject"] == "pool/fast"
            # below the minimum severity: nobody hears of it
            emit(env, "vm_restarted", "vm/x", "info")
            time.sleep(0.5)
            assert len(smtp.mails) == 1 and len(hook.accepted) == 1 and read(0.3) == []
            st = env.api.get("/v1/notify/status").json()
            by = {c["name"]: c for c in st["channels"]}
            assert set(by) == {"mail", "webhook", "syslog"}
            assert by["webhook"]["delivered"] == 1 and by["webhook"]["failures"] == 0 and by["webhook"]["last_ok"]
            assert by["mail"]["target"] == f"it@hospital.example via 127.0.0.1:{smtp.port}"


def test_a_vendor_gets_only_their_departments_events(tmp_path: Path) -> None:
    with mail_server() as smtp, webhook_receiver(SECRET) as lab_hook:
        routes = [NotifyRoute(department="lab", mail_to=["vendor@lab-systems.example"], webhook=lab_hook.url,
                              webhook_secret=SECRET, min_severity="error"),
                  NotifyRoute(department="emr", mail_to=["support@emr-vendor.example"])]  # fmt: skip
        cfg = NotifyConfig(smtp_host="127.0.0.1", smtp_port=smtp.port, mail_to=["it@hospital.example"],
                           min_severity="warning", routes=routes)  # fmt: skip
        with kasou(tmp_path, cfg) as env:
            put_vm(env, "labdb", "lab")
            put_vm(env, "emr1", "emr")
            put_vm(env, "misc", None)
            emit(env, "disk_degraded", "vm/labdb", "error")
            emit(env, "backup_failed", "vm/emr1", "warning")
            emit(env, "backup_failed", "vm/labdb", "warning")  # below the lab route's minimum
            emit(env, "disk_degraded", "vm/misc", "error")
            emit(env, "host_down", "host/host1", "critical")
            wait_for("the site's mails", lambda: len(smtp.to("it@hospital.example")) == 5)
            wait_for("the lab's webhook", lambda: lab_hook.accepted)
            wait_for("the vendors' mails", lambda: smtp.to("vendor@lab-systems.example") and smtp.to(
                "support@emr-vendor.example"))  # fmt: skip
            time.sleep(0.3)
            lab = [m.message["Subject"] for m in smtp.to("vendor@lab-systems.example")]
            emr = [m.message["Subject"] for m in smtp.to("support@emr-vendor.example")]
            assert lab == ["[kasou error] [lab] disk_degraded vm/labdb"]
            assert emr == ["[kasou warning] [emr] backup_failed vm/emr1"]
            assert [(b["event"]["subject"], b["department"]) for b in lab_hook.accepted] == [("vm/labdb", "lab")]
            st = {c["name"]: c for c in env.api.get("/v1/notify/status").json()["channels"]}
            assert st["lab/mail"]["department"] == "lab" and st["lab/mail"]["min_severity"] == "error"
            assert st["emr/mail"]["min_severity"] == "warning"  # the site's


def test_a_hung_receiver_never_holds_up_an_emit_nor_another_channel(tmp_path: Path) -> None:
    with mail_server() as smtp, silent_receiver() as hung:
        cfg = NotifyConfig(smtp_host="127.0.0.1", smtp_port=smtp.port, mail_to=["it@hospital.example"],
                           webhook=hung, webhook_secret=SECRET, min_severity="info")  # fmt: skip
        with kasou(tmp_path, cfg) as env:
            started, slowest = time.monotonic(), 0.0
            for i in range(300):  # more than the webhook channel's queue holds
                t0 = time.monotonic()
                emit(env, "vm_restarted", f"vm/v{i}", "info")
                slowest = max(slowest, time.monotonic() - t0)
            took = time.monotonic() - started
            # were an emit to wait on the receiver, each would take its 10 s timeout: 3000 s in all
            assert took < 60 and slowest < 5, f"300 emits took {took:.1f} s, the slowest {slowest:.2f} s"
            events = env.api.get("/v1/events", params={"limit": 5000}).json()
            assert len([e for e in events if e["kind"] == "vm_restarted"]) == 300  # all recorded
            status = lambda: {c["name"]: c for c in env.api.get("/v1/notify/status").json()["channels"]}  # noqa: E731
            # the mail channel goes on while the webhook hangs: every notice is mailed, or dropped and counted
            # when mail itself falls behind a burst (its queue holds 200: those at least are mailed)
            wait_for("every mail", lambda: len(smtp.mails) + status()["mail"]["dropped"] == 300, timeout=180)
            assert len(smtp.mails) >= 200, len(smtp.mails)
            st = status()
            assert st["webhook"]["dropped"] > 0  # its queue was full: dropped, counted, never waited on
            assert st["webhook"]["delivered"] == 0


def test_a_failing_channel_is_an_event_for_the_others_without_a_loop(tmp_path: Path) -> None:
    with mail_server() as smtp:
        dead = "http://127.0.0.1:9/refused"  # the discard port: nothing listens, the connection is refused
        cfg = NotifyConfig(smtp_host="127.0.0.1", smtp_port=smtp.port, mail_to=["it@hospital.example"],
                           webhook=dead, webhook_attempts=2, webhook_backoff_s=0.01, min_severity="warning")  # fmt: skip
        with kasou(tmp_path, cfg) as env:
            emit(env, "backup_failed", "vm/a", "error")
            emit(env, "backup_failed", "vm/b", "error")
            wait_for("the failure's mail", lambda: any("notify_failed" in m.message["Subject"] for m in smtp.mails))
            webhook = lambda: {c["name"]: c for c in env.api.get("/v1/notify/status").json()["channels"]}["webhook"]  # noqa: E731
            wait_for("both failures", lambda: webhook()["failures"] == 2)
            time.sleep(0.3)
            failed = [m for m in smtp.mails if "notify_failed" in m.message["Subject"]]
            assert len(failed) == 1  # raised once, however often the webhook fails
            assert failed[0].message["Subject"] == "[kasou error] notify_failed notify/webhook"
            active = env.api.get("/v1/events/active").json()
            assert [e["subject"] for e in active if e["kind"] == "notify_failed"] == ["notify/webhook"]
            st = {c["name"]: c for c in env.api.get("/v1/notify/status").json()["channels"]}
            assert st["webhook"]["failures"] == 2 and not st["webhook"]["last_ok"]  # its own failure not sent to it
            assert "failed after 2 attempt(s)" in st["webhook"]["last_error"]


def test_kasou_notify_test_through_the_cli(tmp_path: Path) -> None:
    with mail_server() as smtp, webhook_receiver(SECRET) as hook:
        routes = [NotifyRoute(department="lab", mail_to=["vendor@lab-systems.example"])]
        cfg = NotifyConfig(smtp_host="127.0.0.1", smtp_port=smtp.port, mail_to=["it@hospital.example"],
                           webhook=hook.url, webhook_secret=SECRET, min_severity="error", routes=routes,
                           syslog="tcp://127.0.0.1:9")  # fmt: skip
        with kasou(tmp_path, cfg) as env:
            runner = CliRunner()
            common.client_factory = lambda: Client("http://testserver", TOKEN, http=env.api)
            try:
                r = runner.invoke(cli.app, ["notify", "test"])
                lines = r.output.splitlines()
                assert r.exit_code == 1, r.output  # syslog over TCP to a closed port fails
                assert f"mail (it@hospital.example via 127.0.0.1:{smtp.port}): delivered" in lines
                assert f"webhook ({hook.url}): delivered" in lines
                assert f"lab/mail (vendor@lab-systems.example via 127.0.0.1:{smtp.port}): delivered" in lines
                assert any(x.startswith("syslog (tcp://127.0.0.1:9): failed: syslog to tcp://127.0.0.1:9 failed")
                           for x in lines), lines  # fmt: skip
                assert {m.message["Subject"] for m in smtp.mails} == {
                    "[kasou warning] test: notify_test site",
                    "[kasou warning] [lab] test: notify_test site",
                }
                assert hook.accepted[0]["test"] is True
                # routed as the emr department's, at warning: the lab's route and the error minimum skip it
                r = runner.invoke(cli.app, ["notify", "test", "--severity", "warning", "--department", "emr"])
                assert "lab/mail (vendor@lab-systems.example via 127.0.0.1:" in r.output
                assert "skipped: only department lab's events" in r.output
                assert "mail (it@hospital.example via " in r.output and "skipped: below its minimum severity error" \
                    in r.output  # fmt: skip
                assert r.exit_code == 0, r.output
                r = runner.invoke(cli.app, ["notify", "test", "--severity", "loud"])
                assert r.exit_code == 2 and "loud" in r.output
                r = runner.invoke(cli.app, ["notify", "status"])
                assert r.exit_code == 0, r.output
                r = runner.invoke(cli.app, ["notify", "status", "--json"])
                by = {c["name"]: c for c in json.loads(r.output)["channels"]}
                assert by["syslog"]["failures"] == 1 and "Connection refused" in by["syslog"]["last_error"]
                assert by["lab/mail"]["delivered"] == 1 and by["lab/mail"]["last_ok"] is True
            finally:
                common.client_factory = None


def test_without_channels_nothing_runs_and_the_test_says_so(tmp_path: Path) -> None:
    with kasou(tmp_path, NotifyConfig()) as env:
        assert env.api.get("/v1/notify/status").json()["channels"] == []
        r = env.api.post("/v1/notify/test", json={})
        assert r.status_code == 422 and "no notification channel" in r.json()["message"]
        emit(env, "host_down", "host/h1", "critical")  # recorded as ever
        assert env.services.notifier.status().queued == 0


def test_what_is_queued_at_shutdown_still_goes_out(tmp_path: Path) -> None:
    with mail_server() as smtp:
        cfg = NotifyConfig(smtp_host="127.0.0.1", smtp_port=smtp.port, mail_to=["it@hospital.example"])
        with kasou(tmp_path, cfg) as env:
            for i in range(5):
                emit(env, "host_down", f"host/h{i}", "critical")
        assert len(smtp.mails) == 5  # the API server's stop waited (bounded) for them
