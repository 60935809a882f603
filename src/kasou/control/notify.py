"""Telling people: every event the control plane records (:mod:`kasou.control.events`) goes, by its severity
and its department, to mail, webhooks and syslog.

Settings (:func:`notify_config`, the ``[notify]`` section of the settings file; today read from the
environment): the site's channels, which get every department's events at ``min_severity`` or above, and
routes, each giving one department's events (a VM's department: the subject ``vm/NAME`` of an event is looked
up) to its own contacts, a vendor's mail or webhook, at the route's own minimum severity.

Emitting an event never waits on a receiver: :meth:`Notifier.hand` (a listener of the store's events) only puts
the event on a bounded queue; a dispatcher task finds its department and puts it on the queue of each channel
that wants it, and each channel's task delivers its queue in order. A full queue drops the notice (counted in
the status, and logged). A slow or broken receiver therefore holds up only its own channel, never an emit nor
another channel.

A channel that fails raises the event ``notify_failed`` (error, subject ``notify/CHANNEL``) once, cleared
(``notify_recovered``) at its next delivery; that event goes to the other channels. No loop: a failure to
deliver a ``notify_*`` event raises nothing, and a channel is never sent the event of its own failure.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Callable
from typing import Any

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, ValidationError

from kasou.config import host_name, notify_settings
from kasou.control.base import VMRecords
from kasou.control.events import SEVERITIES, Event, Events, Severity, severity_at_least, subscribe
from kasou.control.notify_channels import DeliveryFailed, MailSender, SyslogSender, WebhookSender, parse_syslog
from kasou.errors import InvalidSetting, InvalidSpec, KasouError, NotFound
from kasou.settings.model import NotifyRoute
from kasou.store.base import Store

log = logging.getLogger(__name__)

QUEUE = 1000  # events waiting for the dispatcher; beyond this they are dropped (and counted)
CHANNEL_QUEUE = 200  # notices waiting for one channel
CLOSE_GRACE_S = 2.0  # at shutdown, how long notices still queued have to go out
FAILED_KIND = "notify_failed"
RECOVERED_KIND = "notify_recovered"
OWN_PREFIX = "notify_"  # the notifier's own events: a failure to deliver one raises nothing


class NotifyConfig(BaseModel):
    """The ``[notify]`` settings (docs/notifications.md)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    webhook: str | None = None
    webhook_secret: str | None = Field(default=None, repr=False)
    webhook_attempts: int = Field(default=5, ge=1, le=20)
    webhook_backoff_s: float = Field(default=1.0, ge=0, le=600)
    smtp_host: str | None = None
    smtp_port: int = Field(default=25, ge=1, le=65535)
    smtp_starttls: bool = False
    smtp_user: str | None = None
    smtp_password: str | None = Field(default=None, repr=False)
    mail_from: str = "kasou@localhost"
    mail_to: list[str] = []
    syslog: str | None = None  # udp://HOST:PORT, tcp://HOST:PORT or local (/dev/log)
    min_severity: Severity = "warning"
    # ``[[notify.route]]`` in the settings file (one table per route), ``routes`` here
    routes: list[NotifyRoute] = Field(default=[], validation_alias=AliasChoices("routes", "route"))

    def check(self) -> NotifyConfig:
        """Refuse settings that cannot work (InvalidSetting naming the setting), before anything is sent."""
        for url, what in [(self.webhook, "webhook")] + [(r.webhook, f"route {r.department}") for r in self.routes]:
            if url is not None and not url.startswith(("http://", "https://")):
                raise InvalidSetting(f"notify {what}: the webhook {url!r} is not an http:// or https:// URL",
                                     setting="KASOU_NOTIFY_WEBHOOK")  # fmt: skip
        for addr in [self.mail_from, *self.mail_to, *(a for r in self.routes for a in r.mail_to)]:
            if "@" not in addr or any(c in addr for c in ",;<>\r\n\t ") or len(addr) > 254:
                raise InvalidSetting(f"notify: {addr!r} is not a mail address", setting="KASOU_NOTIFY_MAIL_TO")
        if (self.mail_to or any(r.mail_to for r in self.routes)) and not self.smtp_host:
            raise InvalidSetting("notify: mail_to is set but smtp_host is not (the mail server to send through)",
                                 setting="KASOU_NOTIFY_SMTP_HOST")  # fmt: skip
        if self.syslog is not None:
            try:
                parse_syslog(self.syslog)
            except ValueError as e:
                raise InvalidSetting(f"notify syslog: {e}", setting="KASOU_NOTIFY_SYSLOG") from None
        seen: set[str] = set()
        for r in self.routes:
            if not r.mail_to and r.webhook is None:
                raise InvalidSetting(f"notify route {r.department}: give mail_to or webhook",
                                     setting="KASOU_NOTIFY_ROUTES")  # fmt: skip
            if r.department in seen:
                raise InvalidSetting(f"notify: two routes for department {r.department}", setting="KASOU_NOTIFY_ROUTES")
            seen.add(r.department)
        return self


def notify_config() -> NotifyConfig:
    """The notification settings: the ``[notify]`` section of the settings (docs/configuration.md), each key
    checked there (a bad value names its key), then checked together (what cannot work: mail without a relay,
    two routes of one department) before anything is sent."""
    section = notify_settings()  # [notify] of the settings file, then KASOU_NOTIFY_* (kasou.settings)
    raw: dict[str, Any] = {
        "webhook": section.webhook,
        "webhook_secret": section.webhook_secret,
        "webhook_attempts": section.webhook_attempts,
        "webhook_backoff_s": section.webhook_backoff,
        "smtp_host": section.smtp_host,
        "smtp_port": section.smtp_port,
        "smtp_starttls": section.smtp_starttls,
        "smtp_user": section.smtp_user,
        "smtp_password": section.smtp_password,
        "mail_to": list(section.mail_to),
        "syslog": section.syslog,
        "min_severity": section.min_severity,
        "routes": list(section.route),
    }
    if section.mail_from is not None:
        raw["mail_from"] = section.mail_from
    try:
        return NotifyConfig.model_validate(raw).check()
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise InvalidSetting(f"notify setting {where}: {first['msg']} (got {first.get('input')!r})",
                             setting="KASOU_NOTIFY_" + str(first["loc"][0]).upper()) from None  # fmt: skip


class ChannelStatus(BaseModel):
    name: str
    kind: str  # mail, webhook, syslog
    target: str
    department: str | None  # a route's: only that department's events
    min_severity: Severity
    delivered: int = 0
    failures: int = 0
    dropped: int = 0  # notices its full queue could not take
    last_time: float | None = None
    last_ok: bool | None = None
    last_error: str | None = None


class NotifyStatus(BaseModel):
    host: str  # the API server whose notifier this is
    channels: list[ChannelStatus]
    dropped: int  # events the full queue could not take
    queued: int


class NotifyTestRequest(BaseModel):
    """Body of ``POST /v1/notify/test``."""

    model_config = ConfigDict(extra="forbid")

    severity: Severity | None = None  # None: every channel, whatever its minimum; else the channels' filters apply
    department: str | None = Field(default=None, min_length=1, max_length=63)


class NotifyTestResult(BaseModel):
    channel: str
    target: str
    outcome: str  # delivered, failed, skipped
    reason: str = ""


Sender = MailSender | WebhookSender | SyslogSender


class Channel:
    """One receiver and the notices waiting for it."""

    def __init__(self, name: str, kind: str, sender: Sender, minimum: Severity, department: str | None) -> None:
        self.sender = sender
        self.status = ChannelStatus(name=name, kind=kind, target=sender.target, department=department,
                                    min_severity=minimum)  # fmt: skip
        self.queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue(CHANNEL_QUEUE)
        self.busy = False  # sending a notice now

    @property
    def name(self) -> str:
        return self.status.name

    def why_not(self, severity: Severity | None, department: str | None) -> str | None:
        """Why an event of ``severity`` and ``department`` is not for this channel; None if it is."""
        s = self.status
        if s.department is not None and department != s.department:
            return f"only department {s.department}'s events"
        if severity is not None and not severity_at_least(severity, s.min_severity):
            return f"below its minimum severity {s.min_severity}"
        return None

    async def deliver(self, notice: dict[str, Any], attempts: int | None = None) -> str | None:
        """Send one notice; None if delivered, else why not. Counted in the status either way."""
        try:
            if isinstance(self.sender, WebhookSender):
                await self.sender.send(notice, attempts)
            else:
                await self.sender.send(notice)
            why = None
        except DeliveryFailed as e:
            why = e.message
        except Exception as e:  # a sender's bug must not end the channel's task
            log.exception("notify channel %s", self.name)
            why = f"{type(e).__name__}: {e}"
        s = self.status
        s.last_time, s.last_ok, s.last_error = time.time(), why is None, why
        if why is None:
            s.delivered += 1
        else:
            s.failures += 1
            log.warning("notification to %s (%s) failed: %s", self.name, s.target, why)
        return why


def channels_of(cfg: NotifyConfig) -> list[Channel]:
    """The channels the settings name: the site's (every department), then each route's."""
    out: list[Channel] = []

    def mail(name: str, to: list[str], minimum: Severity, dept: str | None) -> None:
        assert cfg.smtp_host is not None  # NotifyConfig.check
        sender = MailSender(cfg.smtp_host, cfg.smtp_port, cfg.mail_from, to, cfg.smtp_starttls, cfg.smtp_user,
                            cfg.smtp_password)  # fmt: skip
        out.append(Channel(name, "mail", sender, minimum, dept))

    def hook(name: str, url: str, secret: str | None, minimum: Severity, dept: str | None) -> None:
        sender = WebhookSender(url, secret, cfg.webhook_attempts, cfg.webhook_backoff_s)
        out.append(Channel(name, "webhook", sender, minimum, dept))

    if cfg.mail_to:
        mail("mail", cfg.mail_to, cfg.min_severity, None)
    if cfg.webhook:
        hook("webhook", cfg.webhook, cfg.webhook_secret, cfg.min_severity, None)
    if cfg.syslog:
        out.append(Channel("syslog", "syslog", SyslogSender(cfg.syslog), cfg.min_severity, None))
    for r in cfg.routes:
        minimum = r.min_severity or cfg.min_severity
        if r.mail_to:
            mail(f"{r.department}/mail", r.mail_to, minimum, r.department)
        if r.webhook:
            hook(f"{r.department}/webhook", r.webhook, r.webhook_secret, minimum, r.department)
    return out


class Notifier:
    """Hands every event recorded in ``store`` to the channels of ``config`` (see the module's docstring)."""

    def __init__(self, store: Store, config: NotifyConfig | None = None, host: str | None = None) -> None:
        self.store = store
        self.config = config or NotifyConfig()
        self.host = host or host_name()
        self.channels = channels_of(self.config)
        self.events = Events(store)
        self.records = VMRecords(store)
        self.dropped = 0
        self._dispatching = False
        self._queue: asyncio.Queue[Event] = asyncio.Queue(QUEUE)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._unsubscribe: Callable[[], None] | None = None

    # -- lifecycle -------------------------------------------------------------------

    async def start(self) -> None:
        """Listen to the store's events and start delivering (nothing at all without channels)."""
        if not self.channels or self._tasks:
            return
        self._loop = asyncio.get_running_loop()
        self._unsubscribe = subscribe(self.store, self.hand)
        self._tasks.append(asyncio.create_task(self._dispatch(), name="notify-dispatch"))
        for ch in self.channels:
            self._tasks.append(asyncio.create_task(self._drain(ch), name=f"notify-{ch.name}"))

    async def close(self) -> None:
        """Stop listening; what is queued gets up to ``CLOSE_GRACE_S`` to go out, then the rest is dropped."""
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        deadline = time.monotonic() + CLOSE_GRACE_S
        while self._tasks and time.monotonic() < deadline and self.pending():
            await asyncio.sleep(0.05)
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        self._tasks.clear()

    def pending(self) -> int:
        """Events and notices not delivered yet (queued, or the one each channel is sending)."""
        return self._queue.qsize() + self._dispatching + sum(c.queue.qsize() + c.busy for c in self.channels)

    # -- the path of an event --------------------------------------------------------

    def hand(self, ev: Event) -> None:
        """The store's listener: queue the event, never wait (from another thread: through the loop)."""
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            self._put(ev)
        else:
            loop.call_soon_threadsafe(self._put, ev)

    def _put(self, ev: Event) -> None:
        try:
            self._queue.put_nowait(ev)
        except asyncio.QueueFull:
            self.dropped += 1
            if self.dropped % 100 == 1:
                log.warning("notify: the queue is full; %d events not sent (%s %s)", self.dropped, ev.kind,
                            ev.subject)  # fmt: skip

    async def department_of(self, subject: str) -> str | None:
        """The department of what an event is about: a VM's (``vm/NAME``); None for anything else."""
        kind, _, name = subject.partition("/")
        if kind != "vm" or not name:
            return None
        try:
            return (await self.records.get(name)).department
        except (NotFound, KasouError):
            return None

    def notice(self, ev: Event, department: str | None, test: bool = False) -> dict[str, Any]:
        """What a receiver gets (the webhook's JSON, the syslog message, the mail's fields)."""
        return {"kasou": 1, "id": str(uuid.uuid4()), "host": self.host, "test": test, "department": department,
                "event": ev.model_dump(mode="json")}  # fmt: skip

    async def _dispatch(self) -> None:
        while True:
            ev = await self._queue.get()
            self._dispatching = True
            try:
                dept = await self.department_of(ev.subject)
            except Exception:
                log.exception("notify: the department of %s", ev.subject)
                dept = None
            notice = self.notice(ev, dept)
            for ch in self.channels:
                if ch.why_not(ev.severity, dept) is not None or ev.subject == f"notify/{ch.name}":
                    continue
                try:
                    ch.queue.put_nowait(notice)
                except asyncio.QueueFull:
                    ch.status.dropped += 1
            self._dispatching = False

    async def _drain(self, ch: Channel) -> None:
        while True:
            notice = await ch.queue.get()
            ch.busy = True
            try:
                why = await ch.deliver(notice)
            finally:
                ch.busy = False
            if notice["event"]["kind"].startswith(OWN_PREFIX):
                continue  # the notifier's own events: their failures raise nothing (no loop)
            try:
                await self._raise_or_clear(ch, why)
            except Exception:
                log.exception("notify: recording the state of channel %s", ch.name)

    async def _raise_or_clear(self, ch: Channel, why: str | None) -> None:
        key = f"notify/{self.host}/{ch.name}"
        if why is None:
            await self.events.clear(key, RECOVERED_KIND, f"notifications to {ch.name} ({ch.status.target}) "
                                    "are delivered again")  # fmt: skip
        else:
            await self.events.raise_once(key, FAILED_KIND, f"notify/{ch.name}", f"notifications to {ch.name} "
                                         f"({ch.status.target}) fail: {why}", "error")  # fmt: skip

    # -- what the API shows and does -------------------------------------------------

    def status(self) -> NotifyStatus:
        return NotifyStatus(host=self.host, channels=[c.status.model_copy() for c in self.channels],
                            dropped=self.dropped, queued=self._queue.qsize())  # fmt: skip

    async def test(self, req: NotifyTestRequest) -> list[NotifyTestResult]:
        """Send a test event through every channel now (a webhook once, no retries) and say what each did.
        Without a severity every channel is tried; without a department each route's channel is tried as if
        the event were its department's."""
        if not self.channels:
            raise InvalidSpec("no notification channel is configured (docs/notifications.md)")
        severity: Severity = req.severity or "warning"
        subject = f"department/{req.department}" if req.department else "site"
        message = f"a test notification from kasou on {self.host}, asked for with kasou notify test"
        ev = Event(time=time.time(), severity=severity, kind="notify_test", subject=subject, message=message)

        async def one(ch: Channel) -> NotifyTestResult:
            dept = req.department if req.department is not None else ch.status.department
            why_not = ch.why_not(req.severity, dept)
            if why_not is not None:
                return NotifyTestResult(channel=ch.name, target=ch.status.target, outcome="skipped", reason=why_not)
            why = await ch.deliver(self.notice(ev, dept, test=True), attempts=1)
            return NotifyTestResult(channel=ch.name, target=ch.status.target, outcome="failed" if why else "delivered",
                              reason=why or "")  # fmt: skip

        return list(await asyncio.gather(*(one(ch) for ch in self.channels)))


__all__ = ["SEVERITIES", "Notifier", "NotifyConfig", "NotifyRoute", "notify_config"]
