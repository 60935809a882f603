"""kasou's web UI: static pages served by the API server, talking to the same ``/v1`` API.

No build step and nothing fetched at run time: plain HTML, CSS and ES modules in ``static/``,
noVNC from Debian's ``novnc`` package (``/usr/share/novnc``). Pages sign in with a session
cookie (``POST /v1/auth/login``) and send ``x-kasou-csrf: 1`` with every change.

* ``/ui/`` — the operators' dashboard (hosts, VMs, pools, desktops, jobs, events, metrics);
* ``/ui/console.html?vm=NAME`` — a VM's console (noVNC over the API's websocket proxy);
* ``/ui/portal.html`` — the desktop portal for clinicians ("open my desktop");
* ``/ui/account.html`` — one's own account: change the password, set up the TOTP second factor.

Every answer of the API server, not only these pages, carries the browser protections
(:class:`SecurityHeaders`): a Content-Security-Policy (the pages': scripts and styles from kasou
itself only; the API's and everything else's: nothing at all), ``nosniff``, no framing, no referrer.
FastAPI's Swagger UI and ReDoc pages (``/docs``, ``/redoc``), which load their code from a public CDN,
are not served; the OpenAPI document stays at ``/openapi.json``.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse, Response
from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from kasou.config import novnc_dir
from kasou.errors import NotFound

STATIC = Path(__file__).resolve().parent / "static"
_TYPES = {
    ".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8", ".css": "text/css",
    ".svg": "image/svg+xml", ".png": "image/png", ".json": "application/json", ".ico": "image/x-icon",
}  # fmt: skip
#: Every page: no framing by other sites, no script but kasou's own files (no inline script), nothing cached
#: that holds data. noVNC needs ``data:``/``blob:`` images, inline styles and its websocket.
HEADERS = {
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data: blob:; style-src 'self' 'unsafe-inline'; "
    "connect-src 'self' ws: wss:; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'",
    "Cache-Control": "no-store",
}
#: Every other answer (the API's JSON, errors, the OpenAPI document): nothing in it may run or be framed.
OTHER_HEADERS = {
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Content-Security-Policy": "default-src 'none'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
}


class SecurityHeaders:
    """ASGI middleware: :data:`OTHER_HEADERS` on every HTTP answer that does not set them itself (the
    pages set :data:`HEADERS`)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for k, v in OTHER_HEADERS.items():
                    if k not in headers:
                        headers[k] = v
            await send(message)

        await self.app(scope, receive, send_with_headers)


def _file(root: Path, rel: str) -> Response:
    try:
        path = (root / rel).resolve()
        found = root.resolve() in path.parents and path.is_file()
    except (ValueError, OSError):  # a NUL in the name, a name too long for the file system
        found = False
    if not found:
        raise NotFound(f"no such page: {rel[:200]!r}")
    media = _TYPES.get(path.suffix, "application/octet-stream")
    return FileResponse(path, media_type=media, headers=HEADERS)


def web_routes() -> APIRouter:
    r = APIRouter(include_in_schema=False)

    @r.get("/ui/")
    async def index() -> Response:
        return _file(STATIC, "index.html")

    @r.get("/ui/novnc/{path:path}")
    async def novnc(path: str) -> Response:
        return _file(novnc_dir(), path)  # KASOU_NOVNC_DIR

    @r.get("/ui/{path:path}")
    async def static(path: str) -> Response:
        return _file(STATIC, path)

    return r
