"""The REST API's CD drive routes (``/v1/vms/{name}/media``), included in the token-guarded ``/v1`` router.

``POST`` puts an ISO image of the VM's host in its drive (``{"iso": NAME}``), ``DELETE`` empties it; both
are checked at once (a refusal is a 4xx and changes nothing), then run as a short job (``202`` with the
job; see :mod:`kasou.control.media`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Body
from pydantic import BaseModel

from kasou.control.records import JobRecord
from kasou.model.media import MediaInsert

if TYPE_CHECKING:
    from kasou.api.deps import Services


class MediaJob(BaseModel):
    job: JobRecord


def media_router(svc: Callable[[], Services]) -> APIRouter:
    r = APIRouter()

    @r.post("/vms/{name}/media", status_code=202)
    async def insert_media(name: str, body: dict[str, Any] = Body(...)) -> MediaJob:
        """Put an ISO image in the VM's CD drive, running or stopped: ``{"iso": "debian-12"}``."""
        return MediaJob(job=await svc().vms.media.insert(name, MediaInsert.parse(body)))

    @r.delete("/vms/{name}/media", status_code=202)
    async def eject_media(name: str) -> MediaJob:
        """Empty the VM's CD drive (refused, 409, if it is empty or the VM has none)."""
        return MediaJob(job=await svc().vms.media.eject(name))

    return r
