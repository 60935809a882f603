"""The backup server's API as docs/backup-server.md states it, run against every server that claims it.

The fixture ``vault_server`` is module-scoped and parametrized by :data:`SERVERS`: ``double`` (the in-memory
double of tests/doubles/vault.py, plain http on 127.0.0.1) and, where ``kasou.vault.app`` exists, ``real``
(the backup server's app on a data directory of its own, https with its own certificate, pinned). Each
test uses VM names and chunk contents of its own, so the tests share one server.
"""

from __future__ import annotations

import importlib.util
import os
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from kasou.errors import AlreadyExists, Forbidden, InvalidSpec, NotFound, Unauthorized
from kasou.vault.client import VaultClient, backup_disk, make_generation, pinned_context, restore_disk
from kasou.vault.crypt import CHUNK_SIZE, BackupKey, chunk_id, seal
from tests.doubles.vault import READER_TOKEN, WRITER_TOKEN, create_vault_double, serve

MiB = 1024 * 1024
ERROR_KEYS = {"code", "message", "details"}


@dataclass
class VaultEndpoint:
    """A running backup server: where, a writer's and a reader's token, its certificate's fingerprint."""

    url: str
    writer: str
    reader: str
    fingerprint: str | None

    def client(self, token: str | None = None) -> VaultClient:
        return VaultClient(self.url, self.writer if token is None else token, fingerprint=self.fingerprint)

    def raw(self, token: str | None = None) -> httpx.Client:
        """A bare HTTP client (for requests :class:`VaultClient` would never send)."""
        verify = pinned_context(self.fingerprint) if self.fingerprint else False
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(base_url=self.url, headers=headers, verify=verify, timeout=30, trust_env=False)


@contextmanager
def double_server(tmp: Path) -> Iterator[VaultEndpoint]:
    with serve(create_vault_double()) as url:
        yield VaultEndpoint(url, WRITER_TOKEN, READER_TOKEN, None)


@contextmanager
def real_server(tmp: Path) -> Iterator[VaultEndpoint]:
    from kasou.vault import app, store, tlscert  # the server's modules (one import: sorted alike before and after)

    data = store.Store.create(tmp / "vault", "contract")
    fingerprint = tlscert.make_certificate(tmp / "vault" / "tls", "contract")
    writer, reader = data.add_client("hv1", "writer"), data.add_client("site2", "reader")
    tls = (tmp / "vault" / "tls" / "cert.pem", tmp / "vault" / "tls" / "key.pem")
    try:
        with serve(app.create_app(data), tls=tls) as url:
            yield VaultEndpoint(url, writer, reader, fingerprint)
    finally:  # the generations' files are immutable (chattr +i) where the file system allows: pytest could not remove them
        from kasou.vault import immutable

        immutable.release_tree(tmp)


SERVERS: dict[str, Callable[[Path], Any]] = {"double": double_server}
if importlib.util.find_spec("kasou.vault.app") is not None:
    SERVERS["real"] = real_server


@pytest.fixture(scope="module", params=sorted(SERVERS))
def vault_server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[VaultEndpoint]:
    with SERVERS[request.param](tmp_path_factory.mktemp(f"vault-{request.param}")) as endpoint:
        yield endpoint


@pytest.fixture
def vault_server_url(vault_server: VaultEndpoint) -> str:
    return vault_server.url


@pytest.fixture
def client(vault_server: VaultEndpoint) -> Iterator[VaultClient]:
    with vault_server.client() as c:
        yield c


@pytest.fixture(scope="module")
def key() -> BackupKey:
    return BackupKey.generate()


@pytest.fixture
def vm() -> str:
    return f"contract-{uuid.uuid4().hex[:8]}"


def sealed(key: BackupKey, data: bytes) -> tuple[str, bytes]:
    cid = chunk_id(key, data)
    return cid, seal(key.public(), data, cid)


def index_of(key: BackupKey, vm: str, generation: int, disks: list[dict[str, Any]], config: str) -> dict[str, Any]:
    return {"vm": vm, "vm_uuid": str(uuid.uuid4()), "generation": generation, "created": 1796000000.0,
            "key_fingerprint": key.fingerprint, "chunk_size": CHUNK_SIZE, "disks": disks, "config": config,
            "bytes_sent": 0, "bytes_logical": sum(d["size"] for d in disks)}  # fmt: skip


def is_error(resp: httpx.Response, status: int) -> bool:
    return resp.status_code == status and set(resp.json()) >= ERROR_KEYS


def test_url_fixture(vault_server_url: str) -> None:
    assert vault_server_url.startswith(("http://127.0.0.1:", "https://127.0.0.1:"))


def test_info(client: VaultClient) -> None:
    info = client.info()
    assert {"server_id", "version", "chunk_size"} <= set(info) and info["chunk_size"] == CHUNK_SIZE


def test_missing_and_first_writer_wins(client: VaultClient, key: BackupKey) -> None:
    data = os.urandom(CHUNK_SIZE)
    cid, blob = sealed(key, data)
    other = chunk_id(key, b"not uploaded")
    assert client.missing([cid, other]) == [cid, other]
    assert client.put_chunk(cid, blob) is True
    assert client.missing([cid, other]) == [other]
    assert client.put_chunk(cid, seal(key.public(), data, cid)) is False  # a second upload: 200, not stored
    assert client.put_chunk(cid, b"KSC1" + os.urandom(100)) is False  # garbage under a held id changes nothing
    assert client.get_chunk(cid) == blob


def test_chunk_refusals(vault_server: VaultEndpoint, key: BackupKey) -> None:
    cid = chunk_id(key, os.urandom(32))
    with vault_server.raw(vault_server.writer) as raw:
        assert is_error(raw.put(f"/v1/chunks/{cid}", content=b"NOPE" + bytes(100)), 422)
        assert is_error(raw.put(f"/v1/chunks/{cid.upper()}", content=b"KSC1" + bytes(100)), 422)
        assert is_error(raw.put(f"/v1/chunks/{cid}", content=b"KSC1" + bytes(8 * MiB)), 413)
        assert is_error(raw.post("/v1/chunks/missing", json={"ids": [cid] * 4097}), 422)
        assert is_error(raw.post("/v1/chunks/missing", json={"ids": ["x" * 64]}), 422)
        assert is_error(raw.get(f"/v1/chunks/{cid}"), 404)
    with vault_server.client() as client:
        assert client.missing([cid]) == [cid]
        with pytest.raises(NotFound):
            client.get_chunk(cid)


def test_generations(client: VaultClient, key: BackupKey, vm: str) -> None:
    a, blob_a = sealed(key, os.urandom(CHUNK_SIZE))
    c, blob_c = sealed(key, b'{"spec": {}}')
    for cid, blob in ((a, blob_a), (c, blob_c)):
        client.put_chunk(cid, blob)
    disks = [{"disk_id": "disk0", "size": 2 * CHUNK_SIZE + 512, "chunks": [a, None, a]}]
    index = index_of(key, vm, 1, disks, c)
    state = client.add_generation(index)
    assert state["locked_until"] > state["received"]
    with pytest.raises(AlreadyExists):
        client.add_generation(index)
    with pytest.raises(InvalidSpec):  # a chunk the server does not hold
        client.add_generation(index_of(key, vm, 2, [{**disks[0], "chunks": [a, None, chunk_id(key, b"?")]}], c))
    with pytest.raises(InvalidSpec):  # a chunk list that does not match the size
        client.add_generation(index_of(key, vm, 2, [{**disks[0], "chunks": [a, None]}], c))
    with pytest.raises(InvalidSpec):  # the config is a chunk too
        client.add_generation(index_of(key, vm, 2, disks, chunk_id(key, b"?")))
    with pytest.raises(InvalidSpec):
        client.add_generation({**index_of(key, vm, 2, disks, c), "vm": "../etc"})
    client.add_generation(index_of(key, vm, 3, disks, c))

    got = client.get_generation(vm, 1)
    assert {k: got[k] for k in index} == index  # the index as sent, plus the server's state
    assert got["locked_until"] == state["locked_until"]
    listed = client.list_generations(vm)
    assert [g["generation"] for g in listed] == [1, 3]
    assert listed[0]["disks"] == [{"disk_id": "disk0", "size": 2 * CHUNK_SIZE + 512}]
    assert all("locked_until" in g for g in listed)
    with pytest.raises(NotFound):
        client.get_generation(vm, 2)


def test_roles_and_tokens(vault_server: VaultEndpoint, key: BackupKey, vm: str) -> None:
    cid, blob = sealed(key, os.urandom(64))
    with vault_server.client() as writer:
        writer.put_chunk(cid, blob)
        writer.add_generation(index_of(key, vm, 1, [], cid))
    with vault_server.client(vault_server.reader) as reader:
        assert reader.info()["chunk_size"] == CHUNK_SIZE
        assert reader.missing([cid]) == []
        assert reader.get_chunk(cid) == blob
        assert [g["generation"] for g in reader.list_generations(vm)] == [1]
        assert reader.get_generation(vm, 1)["config"] == cid
        other, other_blob = sealed(key, os.urandom(64))
        with pytest.raises(Forbidden):
            reader.put_chunk(other, other_blob)
        with pytest.raises(Forbidden):
            reader.add_generation(index_of(key, vm, 2, [], cid))
    for token in ("", "kbs1_wrong"):
        with vault_server.raw(token) as raw:
            assert is_error(raw.get("/v1/info"), 401)
            assert is_error(raw.get(f"/v1/chunks/{cid}"), 401)
    with vault_server.client("kbs1_wrong") as stranger, pytest.raises(Unauthorized):
        stranger.missing([cid])


def test_nothing_deletes_or_overwrites(vault_server: VaultEndpoint, key: BackupKey, vm: str) -> None:
    cid, blob = sealed(key, os.urandom(64))
    with vault_server.client() as writer:
        writer.put_chunk(cid, blob)
        index = index_of(key, vm, 1, [], cid)
        writer.add_generation(index)
    with vault_server.raw(vault_server.writer) as raw:
        for method, path in [("DELETE", f"/v1/chunks/{cid}"), ("PATCH", f"/v1/chunks/{cid}"),
                             ("DELETE", f"/v1/generations/{vm}/1"), ("PUT", f"/v1/generations/{vm}/1"),
                             ("PATCH", f"/v1/generations/{vm}/1"), ("DELETE", "/v1/generations"),
                             ("POST", "/v1/policy"), ("PUT", "/v1/policy")]:  # fmt: skip
            resp = raw.request(method, path, json={})
            assert resp.status_code in (404, 405), (method, path, resp.status_code)
    with vault_server.client() as writer:
        assert writer.get_chunk(cid) == blob
        got = writer.get_generation(vm, 1)
        assert {k: got[k] for k in index} == index


def test_a_disk_round_trip(client: VaultClient, key: BackupKey, vm: str, tmp_path: Path) -> None:
    pub = key.public()
    data = bytearray(os.urandom(CHUNK_SIZE) + bytes(CHUNK_SIZE) + os.urandom(MiB))
    path = tmp_path / "disk0.raw"
    path.write_bytes(data)
    first = backup_disk(client, pub, vm, "disk0", path, len(data))
    make_generation(client, pub, vm, str(uuid.uuid4()), [first], {"spec": {"name": vm}})
    data[CHUNK_SIZE] = 1  # the zero chunk is written
    path.write_bytes(data)
    second = backup_disk(client, pub, vm, "disk0", path, len(data), previous=client.get_generation(vm, 1), changed={1})
    assert second["bytes_read"] == CHUNK_SIZE and second["chunks_sent"] == 1
    gen = make_generation(client, pub, vm, str(uuid.uuid4()), [second], {"spec": {"name": vm}})
    assert gen["generation"] == 2
    restore_disk(client, key, client.get_generation(vm, 2), "disk0", tmp_path / "restored.raw")
    assert (tmp_path / "restored.raw").read_bytes() == data
