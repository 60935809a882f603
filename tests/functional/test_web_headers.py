"""Every answer of the API server carries the browser protections (CSP, nosniff, no framing, no
referrer), and nothing it serves loads code from another origin (no Swagger UI from a CDN)."""

from __future__ import annotations

import re

import pytest

from kasou.config import novnc_dir
from kasou.web import STATIC
from tests.functional.conftest import Env

EXTERNAL = re.compile(rb"""(?:src|href)\s*=\s*["']?(?:https?:)?//|cdn\.|unpkg|jsdelivr""", re.IGNORECASE)


@pytest.mark.parametrize("path", ["/docs", "/redoc", "/docs/oauth2-redirect"])
def test_no_swagger_ui_from_a_cdn(env: Env, path: str) -> None:
    """/docs used to load Swagger UI's script from a public CDN on the origin of the session cookie."""
    r = env.api.get(path)
    assert r.status_code == 404 and not EXTERNAL.search(r.content), r.text[:300]


def test_the_openapi_document_is_still_served(env: Env) -> None:
    r = env.api.get("/openapi.json")
    assert r.status_code == 200 and r.json()["info"]["title"] == "kasou"
    root = env.api.get("/").json()
    assert "docs" not in root and root["openapi"] == "/openapi.json"


def pages(env: Env) -> list[str]:
    out = ["/", "/openapi.json", "/v1/vms", "/v1/no-such-thing", "/v1/version", "/ui/", "/ui/console.html",
           "/ui/portal.html", "/ui/account.html", "/ui/kasou.css", "/ui/api.js", "/ui/no-such-page"]  # fmt: skip
    if (novnc_dir() / "vnc.html").exists():
        out += ["/ui/novnc/vnc.html", "/ui/novnc/core/rfb.js"]
    return out


def test_every_answer_carries_the_browser_protections(env: Env) -> None:
    for path in pages(env):
        for headers in ({}, {"Authorization": ""}):  # with the token, and without credentials (401s too)
            r = env.api.get(path, headers=headers)
            h = r.headers
            csp = h.get("content-security-policy", "")
            assert "frame-ancestors 'none'" in csp and "default-src" in csp, (path, r.status_code, dict(h))
            assert "script-src" not in csp or "'unsafe-inline'" not in csp.split("script-src")[1].split(";")[0]
            assert h.get("x-content-type-options") == "nosniff", path
            assert h.get("x-frame-options") == "DENY", path
            assert h.get("referrer-policy") == "no-referrer", path
    r = env.api.get("/v1/vms")
    assert r.headers["content-security-policy"].startswith("default-src 'none'")  # data: nothing to run


def test_the_web_ui_loads_nothing_from_elsewhere() -> None:
    for f in STATIC.iterdir():
        if f.suffix in (".html", ".js", ".css"):
            assert not EXTERNAL.search(f.read_bytes()), f
