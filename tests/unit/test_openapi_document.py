"""The OpenAPI document says what a generated client needs: a schema for every request body (never a bare
``object``), the two security schemes, the public operations marked as such, and examples that kasou accepts."""

from __future__ import annotations

from typing import Any

import pytest

from kasou.api.document import BODIES, EXAMPLES, SECURITY_SCHEMES
from kasou.api.permissions import ROUTES
from kasou.api.spec import openapi_document


@pytest.fixture(scope="module")
def doc() -> dict[str, Any]:
    return openapi_document()


def _resolve(doc: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    ref = schema.get("$ref")
    return doc["components"]["schemas"][ref.rsplit("/", 1)[1]] if ref else schema


def test_no_request_body_is_a_bare_object(doc: dict[str, Any]) -> None:
    bare = []
    for path, methods in doc["paths"].items():
        for method, op in methods.items():
            for media, content in op.get("requestBody", {}).get("content", {}).items():
                s = content.get("schema", {})
                options = s.get("anyOf", [s])
                for o in options:
                    o = _resolve(doc, o)
                    if o.get("type") == "object" and not o.get("properties"):
                        bare.append(f"{method.upper()} {path} ({media})")
    assert not bare, f"request bodies without a schema (add their model to kasou.api.document.BODIES): {bare}"


def test_every_listed_body_is_a_route_of_the_document(doc: dict[str, Any]) -> None:
    for method, path in BODIES:
        assert path in doc["paths"] and method.lower() in doc["paths"][path], (method, path)
        body = doc["paths"][path][method.lower()]["requestBody"]["content"]["application/json"]["schema"]
        assert body == {"$ref": f"#/components/schemas/{BODIES[(method, path)].__name__}"}


def test_security_schemes_and_the_public_operations(doc: dict[str, Any]) -> None:
    assert doc["components"]["securitySchemes"] == SECURITY_SCHEMES
    assert doc["security"] == [{"bearer": []}, {"session": []}]
    public = {(m, p) for (m, p), need in ROUTES.items() if need.public and m != "WS"}
    assert ("POST", "/v1/auth/login") in public
    for path, methods in doc["paths"].items():
        for method, op in methods.items():
            if (method.upper(), path) in public:
                assert op["security"] == [], (method, path)
            else:
                assert "security" not in op, (method, path)  # the document's own: a token or a session


def test_the_examples_are_what_kasou_accepts(doc: dict[str, Any]) -> None:
    for (method, path), example in EXAMPLES.items():
        media = doc["paths"][path][method.lower()]["requestBody"]["content"]["application/json"]
        assert media["example"] == example
        model: Any = BODIES[(method, path)]
        if path == "/v1/maintenance-windows":
            model.parse(example, now=example["starts_at"] - 3600)
        else:
            model.parse(example)
