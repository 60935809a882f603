"""The OpenAPI document of the REST API, as checked into the repository."""

from __future__ import annotations

from pathlib import Path
from typing import Any

CHECKED_IN = Path(__file__).with_name("openapi.json")


def openapi_document() -> dict[str, Any]:
    from kasou.api.app import create_app
    from kasou.api.deps import Services

    async def never() -> Services:  # the document needs no running services
        raise RuntimeError("not started")

    return create_app(never, token="-").openapi()
