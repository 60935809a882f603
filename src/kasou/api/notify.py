"""``/v1/notify``: how kasou tells people of events (:mod:`kasou.control.notify`). ``GET /v1/notify/status``
shows this API server's channels, what each last did and how often it failed; ``POST /v1/notify/test``
(administrators) sends a test event through every channel and says, per channel, delivered, failed (why) or
skipped (why: another department's route, a higher minimum severity)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from fastapi import APIRouter
from pydantic import BaseModel

from kasou.control.notify import NotifyStatus, NotifyTestRequest, NotifyTestResult

if TYPE_CHECKING:
    from kasou.api.deps import Services


class NotifyTestAnswer(BaseModel):
    results: list[NotifyTestResult]


def notify_routes(svc: Callable[[], Services]) -> APIRouter:
    r = APIRouter(prefix="/notify")

    @r.get("/status")
    async def status() -> NotifyStatus:
        """The channels configured on this API server and how their deliveries went (since it started)."""
        return svc().notifier.status()

    @r.post("/test")
    async def test(body: NotifyTestRequest | None = None) -> NotifyTestAnswer:
        """A test event through every channel now (a webhook is tried once). ``severity``: apply the channels'
        minimum severities to an event of this one; ``department``: route it as that department's event."""
        return NotifyTestAnswer(results=await svc().notifier.test(body or NotifyTestRequest()))

    return r
