"""HTTP and kasou errors, both directions, in one place.

Servers (the API and the host agent) answer every :class:`KasouError` with
``{"code", "message", "details"}`` and the status below; clients turn such an
answer back into the same exception class.
"""

from __future__ import annotations

import json
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
    (E.TooLarge, 413),
    (E.RateLimited, 429),
    (E.Unauthorized, 401),
    (E.Forbidden, 403),
    (E.StoreConflict, 409),
    (E.StoreError, 503),
    (E.AgentUnavailable, 503),
    (E.DirectoryUnavailable, 503),
    (E.OperationTimeout, 504),
    (E.HypervisorError, 502),
    (E.ImageError, 500),
    (E.KasouError, 500),
]


# kasou's code for an HTTP error raised by the framework itself (a route that does not exist, a body it cannot read)
HTTP_CODES = {400: "bad_request", 401: "unauthorized", 404: "not_found", 405: "method_not_allowed", 413: "too_large",
              429: "rate_limited"}  # fmt: skip


def status_for(error: E.KasouError) -> int:
    for cls, status in STATUS:
        if isinstance(error, cls):
            return status
    return 500


def error_body(error: E.KasouError) -> dict[str, Any]:
    return error.to_dict()


def error_headers(error: E.KasouError) -> dict[str, str] | None:
    """HTTP headers an error's answer carries: ``Retry-After`` (seconds) for a rate-limited request."""
    wait = error.details.get("retry_after_s")
    if isinstance(error, E.RateLimited) and isinstance(wait, int):
        return {"Retry-After": str(max(1, wait))}
    return None


#: What a route may answer besides its own success, all in kasou's error shape (documented on every route).
ERROR_RESPONSES: dict[int, str] = {
    400: "The request cannot be read (a malformed body)",
    401: "No or a wrong API token, session or password",
    403: "Signed in, but not allowed to",
    404: "No such VM, image, job, host, pool, user...",
    409: "Exists already, the wrong state, or the host cannot take it",
    413: "The request body is too large",
    422: "Invalid input: a name, a size, a count; nothing has happened",
    502: "QEMU refused or died",
    503: "The state store or a host agent does not answer",
    504: "A bounded wait ran out",
}
ERROR_SCHEMA: dict[str, Any] = {
    "title": "Error",
    "type": "object",
    "required": ["code", "message", "details"],
    "properties": {
        "code": {"type": "string", "title": "Code"},
        "message": {"type": "string", "title": "Message"},
        "details": {"type": "object", "title": "Details"},
    },
}


def document_errors(doc: dict[str, Any]) -> dict[str, Any]:
    """Add kasou's error answers (:data:`ERROR_RESPONSES`, body :data:`ERROR_SCHEMA`) to every operation of an
    OpenAPI document, in place of FastAPI's own 422 shape, which kasou never sends."""
    schemas = doc.setdefault("components", {}).setdefault("schemas", {})
    schemas["Error"] = ERROR_SCHEMA
    ref = {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}
    for methods in doc.get("paths", {}).values():
        for op in methods.values():
            responses = op.setdefault("responses", {})
            for status, text in ERROR_RESPONSES.items():
                responses[str(status)] = {"description": text, "content": ref}
    text = json.dumps(doc.get("paths", {}))
    for unused in ("HTTPValidationError", "ValidationError"):
        if f"#/components/schemas/{unused}" not in text:
            schemas.pop(unused, None)
    return doc


def install_error_handlers(app: FastAPI) -> None:
    """Make a FastAPI app answer kasou's errors, bad requests and 404s in kasou's JSON shape (and its OpenAPI
    document say so)."""
    from fastapi import Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    build = app.openapi
    documented: list[bool] = []

    def openapi() -> dict[str, Any]:
        doc = build()
        if not documented:
            document_errors(doc)
            documented.append(True)
        return doc

    app.openapi = openapi  # type: ignore[method-assign]

    @app.exception_handler(E.KasouError)
    async def _kasou(_req: Request, exc: E.KasouError) -> JSONResponse:
        return JSONResponse(error_body(exc), status_code=status_for(exc), headers=error_headers(exc))

    @app.exception_handler(RequestValidationError)
    async def _invalid(_req: Request, exc: RequestValidationError) -> JSONResponse:
        errs = exc.errors()
        first = errs[0] if errs else {"loc": ("request",), "msg": "invalid request"}
        loc = [str(p) for p in first.get("loc", ()) if p not in ("body", "query", "path")]
        field = ".".join(loc) or "request"
        err = E.InvalidSpec(f"{field}: {first.get('msg', 'invalid')}", field=field)
        if first.get("type") == "json_invalid":  # loc is the offset: say what is wrong instead
            err = E.InvalidSpec(f"the body is not valid JSON (at character {field})", field="body")
        return JSONResponse(error_body(err), status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_req: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = HTTP_CODES.get(exc.status_code, "error")
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
