"""The backup server's API in process: its routes and nothing else, tokens and roles, write-once chunks,
generations refused or kept, errors in kasou's shape."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient

from kasou.vault.app import create_app
from kasou.vault.index import MAX_BLOB
from kasou.vault.store import Store
from tests.unit.vault.helpers import blob, fake_id, make_index

ROUTES = {
    ("GET", "/v1/info"),
    ("POST", "/v1/chunks/missing"),
    ("PUT", "/v1/chunks/{chunk_id}"),
    ("GET", "/v1/chunks/{chunk_id}"),
    ("POST", "/v1/generations"),
    ("GET", "/v1/generations"),
    ("GET", "/v1/generations/{vm}/{generation}"),
    ("POST", "/v1/generations/{vm}/{generation}/copied"),
}


@pytest.fixture
def api(store: Store) -> Iterator[tuple[TestClient, dict[str, str], dict[str, str]]]:
    writer = {"Authorization": f"Bearer {store.add_client('hv1', 'writer')}"}
    reader = {"Authorization": f"Bearer {store.add_client('site-b', 'reader')}"}
    with TestClient(create_app(store)) as c:
        yield c, writer, reader


def test_only_the_documented_routes_exist_no_delete_patch_or_other_put(store: Store) -> None:
    app = create_app(store)
    seen = set()
    for route in app.routes:
        methods = getattr(route, "methods", None) or set()
        assert not methods & {"DELETE", "PATCH"}, route
        if isinstance(route, APIRoute):
            for m in methods:
                seen.add((m, route.path))
        else:  # FastAPI's own: the OpenAPI document (docs are off)
            assert methods <= {"GET", "HEAD"}, route
    assert seen == ROUTES
    assert [p for m, p in seen if m == "PUT"] == ["/v1/chunks/{chunk_id}"]


def test_no_token_or_a_wrong_one_is_401(api: tuple[TestClient, dict[str, str], dict[str, str]]) -> None:
    c, _w, _r = api
    for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": "Basic eDp5"}):
        r = c.get("/v1/info", headers=headers)
        assert r.status_code == 401
        assert r.json()["code"] == "unauthorized" and set(r.json()) == {"code", "message", "details"}
    assert c.put(f"/v1/chunks/{'a' * 64}", content=blob()).status_code == 401


def test_a_reader_may_read_but_not_write(store: Store, api: tuple[TestClient, dict[str, str], dict[str, str]]) -> None:
    c, w, r = api
    b = blob()
    cid = fake_id(b)
    refused = c.put(f"/v1/chunks/{cid}", content=b, headers=r)
    assert refused.status_code == 403 and refused.json()["code"] == "forbidden"
    assert not store.has_chunk(cid)
    assert c.put(f"/v1/chunks/{cid}", content=b, headers=w).status_code == 201
    assert c.post("/v1/generations", json=make_index("vm1", 1, [cid], cid), headers=r).status_code == 403
    assert c.post("/v1/chunks/missing", json={"ids": [cid, "f" * 64]}, headers=r).json() == {"missing": ["f" * 64]}
    got = c.get(f"/v1/chunks/{cid}", headers=r)
    assert got.status_code == 200 and got.content == b
    info = c.get("/v1/info", headers=r).json()
    assert info["server_id"] == store.info()["server_id"] and info["chunk_size"] == 4 * 1024 * 1024


def test_a_second_put_of_a_chunk_leaves_the_first_bytes(api: tuple[TestClient, dict[str, str], dict[str, str]]) -> None:
    c, w, _r = api
    first, garbage = blob(), blob()
    cid = fake_id(first)
    assert c.put(f"/v1/chunks/{cid}", content=first, headers=w).status_code == 201
    again = c.put(f"/v1/chunks/{cid}", content=garbage, headers=w)
    assert again.status_code == 200 and again.json()["stored"] is False
    assert c.get(f"/v1/chunks/{cid}", headers=w).content == first


def test_chunk_bodies_are_bounded_and_checked(
    store: Store, api: tuple[TestClient, dict[str, str], dict[str, str]]
) -> None:
    c, w, _r = api
    big = c.put(f"/v1/chunks/{'a' * 64}", content=b"KSC1" + bytes(MAX_BLOB), headers=w)
    assert big.status_code == 413 and big.json()["code"] == "too_large"

    def chunked() -> Iterator[bytes]:  # no Content-Length: the server stops reading past the bound
        yield b"KSC1"
        for _ in range(9):
            yield bytes(1024 * 1024)

    assert c.put(f"/v1/chunks/{'b' * 64}", content=chunked(), headers=w).status_code == 413
    assert c.put(f"/v1/chunks/{'c' * 64}", content=b"plain", headers=w).status_code == 422
    assert c.put(f"/v1/chunks/{'C' * 64}", content=blob(), headers=w).status_code == 422
    assert c.get(f"/v1/chunks/{'d' * 64}", headers=w).status_code == 404
    assert c.post("/v1/chunks/missing", json={"ids": ["a" * 64] * 4097}, headers=w).status_code == 422
    assert list(store.chunk_files()) == []


def test_generations_through_the_api(store: Store, api: tuple[TestClient, dict[str, str], dict[str, str]]) -> None:
    c, w, r = api
    blobs = [blob() for _ in range(3)]
    ids = [fake_id(b) for b in blobs]
    for cid, b in zip(ids[:2], blobs[:2], strict=True):
        c.put(f"/v1/chunks/{cid}", content=b, headers=w)
    index = make_index("emr-db", 1, [ids[0], None, ids[2]], ids[1])
    missing = c.post("/v1/generations", json=index, headers=w)
    assert missing.status_code == 422 and ids[2] in missing.json()["message"]
    c.put(f"/v1/chunks/{ids[2]}", content=blobs[2], headers=w)
    added = c.post("/v1/generations", json=index, headers=w)
    assert added.status_code == 201
    state = added.json()
    assert state["locked_until"] == state["received"] + 30 * 86400
    again = c.post("/v1/generations", json=index, headers=w)
    assert again.status_code == 409
    bad = c.post("/v1/generations", json={**index, "generation": 2, "vm": "a/b"}, headers=w)
    assert bad.status_code == 422 and bad.json()["code"] == "invalid_spec"
    assert c.post("/v1/generations", content=b"{", headers=w).status_code == 422
    listed = c.get("/v1/generations", params={"vm": "emr-db"}, headers=r).json()
    assert len(listed) == 1 and listed[0]["disks"] == [{"disk_id": "root", "size": 3 * 4194304}]
    assert listed[0]["locked_until"] == state["locked_until"] and listed[0]["damaged"] == []
    one = c.get("/v1/generations/emr-db/1", headers=r).json()
    assert one["disks"][0]["chunks"] == [ids[0], None, ids[2]] and one["received"] == state["received"]
    assert c.get("/v1/generations/emr-db/2", headers=r).status_code == 404
    assert c.get("/v1/generations", headers=r).json() == listed
    # A second site's receipt: under the reader's own name, once; a writer (a hypervisor) cannot claim one.
    assert c.post("/v1/generations/emr-db/1/copied", headers=w).status_code == 403
    assert c.post("/v1/generations/emr-db/2/copied", headers=r).status_code == 404
    for _ in range(2):
        got = c.post("/v1/generations/emr-db/1/copied", headers=r)
        assert got.status_code == 200 and [x["site"] for x in got.json()["copied_to"]] == ["site-b"], got.text
    listed = c.get("/v1/generations", params={"vm": "emr-db"}, headers=r).json()
    assert listed[0]["copied_to"][0]["site"] == "site-b" and listed[0]["locked_until"] == state["locked_until"]


def test_hostile_input_is_a_clear_4xx(store: Store, api: tuple[TestClient, dict[str, str], dict[str, str]]) -> None:
    c, w, _r = api
    deep = b"[" * 100_000 + b"]" * 100_000
    for path in ("/v1/generations", "/v1/chunks/missing"):
        r = c.post(path, content=deep, headers=w)
        assert r.status_code == 422 and r.json()["code"] == "invalid_spec"
    for path in ("/v1/generations/..%2F..%2Fetc/1", "/v1/generations/a%00b/1", f"/v1/chunks/..%2F{'a' * 61}",
                 "/v1/generations?vm=..", "/v1/generations/emr/-1", "/v1/generations/emr/1000000"):  # fmt: skip
        r = c.get(path, headers=w)
        assert r.status_code in (404, 422), (path, r.status_code)
        assert set(r.json()) == {"code", "message", "details"}
    assert store.vms() == [] and list(store.chunk_files()) == []


def test_an_isolated_server_refuses_every_client(
    store: Store, api: tuple[TestClient, dict[str, str], dict[str, str]]
) -> None:
    http, writer, reader = api
    store.set_isolated(True)
    for headers in (writer, reader):
        r = http.get("/v1/info", headers=headers)
        assert r.status_code == 409 and "isolated" in r.json()["message"], r.text
    assert http.post("/v1/chunks/missing", json={"ids": []}, headers=writer).status_code == 409
    store.set_isolated(False)
    assert http.get("/v1/info", headers=reader).status_code == 200
    assert [e["event"] for e in store.events()][-2:] == ["isolated", "rejoined"]
