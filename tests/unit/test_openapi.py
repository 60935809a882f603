"""The OpenAPI document checked into the repository is the one the API serves."""

from __future__ import annotations

import json

from kasou.api.spec import CHECKED_IN, openapi_document


def test_checked_in_spec_is_current() -> None:
    current = openapi_document()
    assert CHECKED_IN.exists(), "run: kasou api openapi > src/kasou/api/openapi.json"
    assert json.loads(CHECKED_IN.read_text()) == current, "run: kasou api openapi > src/kasou/api/openapi.json"


def test_every_v1_route_needs_the_token() -> None:
    from fastapi.testclient import TestClient

    from kasou.api.app import create_app

    async def factory():  # type: ignore[no-untyped-def]
        raise RuntimeError("no services in this test")

    app = create_app(factory, "secret")
    client = TestClient(app)  # no lifespan: auth is checked before any service is needed
    doc = openapi_document()
    for path, methods in doc["paths"].items():
        if path in ("/v1/auth/login", "/v1/directory/status", "/v1/cluster/ca", "/v1/cluster/join"):
            continue  # signing in (401 for a wrong password), whether the directory answers, the site CA's
            # certificate and a host's join (its one-time join token instead) need no token
        concrete = path.replace("{name}", "x").replace("{job_id}", "j1").replace("{action}", "start")
        concrete = concrete.replace("{snapshot}", "s1")
        concrete = concrete.replace("{generation}", "1")
        concrete = concrete.replace("{pool}", "p1")
        for method in methods:
            r = client.request(method.upper(), concrete)
            assert r.status_code == 401, (method, path, r.status_code)
