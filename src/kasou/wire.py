"""HTTP and kasou errors, both directions, in one place.

Servers (the API and the host agent) answer every :class:`KasouError` with
``{"code", "message", "details"}`` and the status below; clients turn such an
answer back into the same exception class.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import httpx

from kasou import errors as E

if TYPE_CHECKING:  # the server side imports FastAPI; clients (the CLI) must not pay for it
    from fastapi import FastAPI

log = logging.getLogger(__name__)

# Most specific first: the first class an error is an instance of decides.
STATUS: list[tuple[type[E.KasouError], int]] = [
    (E.InvalidSpec, 422),
    (E.NotFound, 404),
    (E.Conflict, 409),
    (E.InsufficientResources, 409),
    (E.Unauthorized, 401),
    (E.Forbidden, 403),
    (E.StoreConflict, 409),
    (E.StoreError, 503),
    (E.AgentUnavailable, 503),
    (E.OperationTimeout, 504),
    (E.HypervisorError, 502),
    (E.ImageError, 500),
    (E.KasouError, 500),
]


def status_for(error: E.KasouError) -> int:
    for cls, status in STATUS:
        if isinstance(error, cls):
            return status
    return 500


def error_body(error: E.KasouError) -> dict[str, Any]:
    return error.to_dict()


def install_error_handlers(app: FastAPI) -> None:
    """Make a FastAPI app answer kasou's errors, bad requests and 404s in kasou's JSON shape."""
    from fastapi import Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    @app.exception_handler(E.KasouError)
    async def _kasou(_req: Request, exc: E.KasouError) -> JSONResponse:
        return JSONResponse(error_body(exc), status_code=status_for(exc))

    @app.exception_handler(RequestValidationError)
    async def _invalid(_req: Request, exc: RequestValidationError) -> JSONResponse:
        errs = exc.errors()
        first = errs[0] if errs else {"loc": ("request",), "msg": "invalid request"}
        loc = [str(p) for p in first.get("loc", ()) if p not in ("body", "query", "path")]
        field = ".".join(loc) or "request"
        err = E.InvalidSpec(f"{field}: {first.get('msg', 'invalid')}", field=field)
        return JSONResponse(error_body(err), status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_req: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {401: "unauthorized", 404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "error")
        body = {"code": code, "message": str(exc.detail), "details": {}}
        return JSONResponse(body, status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(_req: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error")
        body = {"code": "internal", "message": f"internal error: {type(exc).__name__}", "details": {}}
        return JSONResponse(body, status_code=500)


def raise_for_response(resp: httpx.Response) -> None:
    """Re-raise a kasou error sent by a server; plain HTTP errors become KasouError too."""
    if resp.status_code < 400:
        return
    try:
        data = resp.json()
    except ValueError:
        data = None
    if isinstance(data, dict) and "message" in data:
        raise E.from_dict(data)
    if resp.status_code == 401:
        raise E.Unauthorized("the API refused the token")
    raise E.KasouError(f"HTTP {resp.status_code}: {resp.text[:200].strip() or resp.reason_phrase}")
