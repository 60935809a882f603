"""The backup server's client against the in-memory double (tests/doubles/vault.py) served by uvicorn on
127.0.0.1 (plain http: loopback): backup, deduplication, incremental backups, restore, and the refusals."""

from __future__ import annotations

import asyncio
import io
import os
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from kasou.errors import (
    AlreadyExists,
    BackupCorrupt,
    Forbidden,
    InvalidSpec,
    NotFound,
    OperationTimeout,
    Unauthorized,
)
from kasou.vault.client import (
    BackupServerUnavailable,
    VaultClient,
    backup_disk,
    make_generation,
    restore_config,
    restore_disk,
)
from kasou.vault.crypt import CHUNK_SIZE, BackupKey, chunk_id, seal
from tests.doubles.vault import READER_TOKEN, WRITER_TOKEN, VaultDouble, create_vault_double, serve

MiB = 1024 * 1024
URL = "http://127.0.0.1"
UUID = "6f1c1a6e-0000-4000-8000-000000000001"


@pytest.fixture(scope="module")
def key() -> BackupKey:
    return BackupKey.generate()


@pytest.fixture(scope="module")
def server() -> Iterator[tuple[VaultDouble, str]]:
    double = VaultDouble()
    with serve(create_vault_double(double)) as url:
        yield double, url


@pytest.fixture
def vault(server: tuple[VaultDouble, str]) -> VaultDouble:
    server[0].reset()
    return server[0]


@pytest.fixture
def url(server: tuple[VaultDouble, str]) -> str:
    return server[1]


@pytest.fixture
def client(vault: VaultDouble, url: str) -> Iterator[VaultClient]:
    with VaultClient(url, WRITER_TOKEN) as c:
        yield c


def make_image(path: Path) -> bytes:
    """4 chunks and a short one: data, zeros, data, a copy of chunk 0, 1 MiB of data."""
    a = os.urandom(CHUNK_SIZE)
    data = a + bytes(CHUNK_SIZE) + os.urandom(CHUNK_SIZE) + a + os.urandom(MiB)
    path.write_bytes(data)
    return data


def chunk_puts(vault: VaultDouble) -> int:
    return sum(1 for method, path in vault.requests if method == "PUT")


def test_backup_and_restore(tmp_path: Path, key: BackupKey, client: VaultClient, vault: VaultDouble) -> None:
    pub = key.public()
    data = make_image(tmp_path / "disk0.raw")
    disk = backup_disk(client, pub, "emr-db", "disk0", tmp_path / "disk0.raw", len(data))
    assert disk["chunks"][1] is None and disk["chunks"][0] == disk["chunks"][3]
    assert disk["chunks_sent"] == 3 and disk["bytes_read"] == len(data)
    assert 2 * CHUNK_SIZE + MiB < disk["bytes_sent"] < 2 * CHUNK_SIZE + MiB + 4096  # random data: no gain
    config = {"spec": {"name": "emr-db", "vcpus": 2}, "tpm": "AAAA"}
    gen = make_generation(client, pub, "emr-db", UUID, [disk], config)
    assert gen["generation"] == 1 and gen["locked_until"] > gen["received"]
    assert gen["bytes_logical"] == len(data) and gen["key_fingerprint"] == key.fingerprint
    assert set(vault.generations["emr-db", 1]) == {"vm", "vm_uuid", "generation", "created", "key_fingerprint",
                                                   "chunk_size", "disks", "config", "bytes_sent", "bytes_logical"}  # fmt: skip
    assert vault.generations["emr-db", 1]["disks"] == [
        {"disk_id": "disk0", "size": len(data), "chunks": disk["chunks"]}
    ]

    index = client.get_generation("emr-db", 1)
    vault.requests.clear()
    done = restore_disk(client, key, index, "disk0", tmp_path / "restored.raw")
    assert (tmp_path / "restored.raw").read_bytes() == data
    assert done["chunks_fetched"] == 3 and done["bytes_written"] == 3 * CHUNK_SIZE + MiB
    assert (tmp_path / "restored.raw").stat().st_blocks * 512 <= len(data) - CHUNK_SIZE + 4096  # sparse
    assert restore_config(client, key, index) == config


def test_an_unchanged_disk_sends_nothing(
    tmp_path: Path, key: BackupKey, client: VaultClient, vault: VaultDouble
) -> None:
    pub = key.public()
    data = make_image(tmp_path / "disk0.raw")
    first = backup_disk(client, pub, "emr-db", "disk0", tmp_path / "disk0.raw", len(data))
    make_generation(client, pub, "emr-db", UUID, [first], {"a": 1})
    puts = chunk_puts(vault)
    again = backup_disk(client, pub, "emr-db", "disk0", tmp_path / "disk0.raw", len(data))
    assert again["bytes_sent"] == 0 and again["chunks"] == first["chunks"] and chunk_puts(vault) == puts
    second = make_generation(client, pub, "emr-db", UUID, [again], {"a": 1})
    assert second["generation"] == 2 and second["bytes_sent"] == 0 and chunk_puts(vault) == puts


def test_incremental_reads_and_sends_only_changed_chunks(
    tmp_path: Path, key: BackupKey, client: VaultClient, vault: VaultDouble
) -> None:
    pub = key.public()
    path = tmp_path / "disk0.raw"
    data = bytearray(make_image(path))
    first = backup_disk(client, pub, "emr-db", "disk0", path, len(data))
    make_generation(client, pub, "emr-db", UUID, [first], {})
    previous = client.get_generation("emr-db", 1)

    data[2 * CHUNK_SIZE + 5] ^= 0xFF  # the guest wrote to chunk 2
    path.write_bytes(data)
    puts = chunk_puts(vault)
    disk = backup_disk(client, pub, "emr-db", "disk0", path, len(data), previous=previous, changed={2})
    assert disk["bytes_read"] == CHUNK_SIZE and disk["chunks_sent"] == 1 and chunk_puts(vault) == puts + 1
    assert disk["chunks"][2] == chunk_id(key, bytes(data[2 * CHUNK_SIZE : 3 * CHUNK_SIZE]))
    assert disk["chunks"][:2] == first["chunks"][:2] and disk["chunks"][3:] == first["chunks"][3:]
    make_generation(client, pub, "emr-db", UUID, [disk], {})
    restore_disk(client, key, client.get_generation("emr-db", 2), "disk0", tmp_path / "r.raw")
    assert (tmp_path / "r.raw").read_bytes() == data


def test_a_reused_chunk_gone_from_the_server_is_read_again(
    tmp_path: Path, key: BackupKey, client: VaultClient, vault: VaultDouble
) -> None:
    pub = key.public()
    path = tmp_path / "disk0.raw"
    data = make_image(path)
    first = backup_disk(client, pub, "emr-db", "disk0", path, len(data))
    previous = {"disk_id": "disk0", "size": len(data), "chunks": first["chunks"]}
    del vault.chunks[first["chunks"][2]]  # collected since (say the generation was pruned)
    disk = backup_disk(client, pub, "emr-db", "disk0", path, len(data), previous=previous, changed=set())
    assert disk["chunks"] == first["chunks"] and disk["bytes_read"] == CHUNK_SIZE and disk["chunks_sent"] == 1
    assert first["chunks"][2] in vault.chunks


def test_a_wrong_dirty_map_does_not_lose_writes(
    tmp_path: Path, key: BackupKey, client: VaultClient, vault: VaultDouble
) -> None:
    """A reused chunk read again (gone from the server) that differs from its old id gets its new id."""
    pub = key.public()
    path = tmp_path / "disk0.raw"
    data = bytearray(make_image(path))
    first = backup_disk(client, pub, "emr-db", "disk0", path, len(data))
    del vault.chunks[first["chunks"][2]]
    data[2 * CHUNK_SIZE] ^= 1
    path.write_bytes(data)
    disk = backup_disk(client, pub, "emr-db", "disk0", path, len(data), previous=first, changed=set())
    assert disk["chunks"][2] == chunk_id(key, bytes(data[2 * CHUNK_SIZE : 3 * CHUNK_SIZE]))


def test_a_previous_generation_of_another_key_is_not_reused(
    tmp_path: Path, key: BackupKey, client: VaultClient, vault: VaultDouble
) -> None:
    old = BackupKey.generate()
    path = tmp_path / "disk0.raw"
    data = make_image(path)
    first = backup_disk(client, old.public(), "emr-db", "disk0", path, len(data))
    make_generation(client, old.public(), "emr-db", UUID, [first], {})
    disk = backup_disk(client, key.public(), "emr-db", "disk0", path, len(data),
                       previous=client.get_generation("emr-db", 1), changed=set())  # fmt: skip
    assert disk["bytes_read"] == len(data) and disk["chunks"] != first["chunks"]


def test_restore_with_the_wrong_key_reads_no_chunk(
    tmp_path: Path, key: BackupKey, client: VaultClient, vault: VaultDouble
) -> None:
    path = tmp_path / "disk0.raw"
    data = make_image(path)
    disk = backup_disk(client, key.public(), "emr-db", "disk0", path, len(data))
    make_generation(client, key.public(), "emr-db", UUID, [disk], {})
    index = client.get_generation("emr-db", 1)
    vault.requests.clear()
    with pytest.raises(InvalidSpec, match=f"encrypted to key {key.fingerprint}, not to this key"):
        restore_disk(client, BackupKey.generate(), index, "disk0", tmp_path / "r.raw")
    assert vault.requests == [] and not (tmp_path / "r.raw").exists()
    with pytest.raises(NotFound, match=r"no disk 'disk9'.*disk0"):
        restore_disk(client, key, index, "disk9", tmp_path / "r.raw")


def test_a_tampered_chunk_fails_the_restore_and_leaves_nothing(
    tmp_path: Path, key: BackupKey, client: VaultClient, vault: VaultDouble
) -> None:
    path = tmp_path / "disk0.raw"
    data = make_image(path)
    disk = backup_disk(client, key.public(), "emr-db", "disk0", path, len(data))
    make_generation(client, key.public(), "emr-db", UUID, [disk], {})
    index = client.get_generation("emr-db", 1)
    target = disk["chunks"][2]
    blob = bytearray(vault.chunks[target])
    blob[100] ^= 1
    vault.chunks[target] = bytes(blob)
    with pytest.raises(BackupCorrupt):
        restore_disk(client, key, index, "disk0", tmp_path / "r.raw")
    # A blob of another chunk put in its place (the server cannot tell) fails the same way.
    vault.chunks[target] = vault.chunks[disk["chunks"][0]]
    with pytest.raises(BackupCorrupt):
        restore_disk(client, key, index, "disk0", tmp_path / "r.raw")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["disk0.raw"]


def test_generation_numbers_and_conflicts(key: BackupKey, client: VaultClient) -> None:
    pub = key.public()
    disk = backup_disk(client, pub, "emr-db", "disk0", io.BytesIO(b"x" * 1000), 1000)
    assert make_generation(client, pub, "emr-db", UUID, [disk], {})["generation"] == 1
    assert make_generation(client, pub, "emr-db", UUID, [disk], {}, generation=5)["generation"] == 5
    assert make_generation(client, pub, "emr-db", UUID, [disk], {})["generation"] == 6
    with pytest.raises(AlreadyExists):
        make_generation(client, pub, "emr-db", UUID, [disk], {}, generation=5)
    listed = client.list_generations("emr-db")
    assert [g["generation"] for g in listed] == [1, 5, 6]
    assert listed[0]["disks"] == [{"disk_id": "disk0", "size": 1000}]
    assert client.list_generations("other-vm") == []


def test_a_generation_naming_a_chunk_not_held_is_refused(key: BackupKey, client: VaultClient) -> None:
    pub = key.public()
    disk = {"disk_id": "disk0", "size": 1000, "chunks": [chunk_id(pub, b"never uploaded")]}
    with pytest.raises(InvalidSpec, match="not held"):
        make_generation(client, pub, "emr-db", UUID, [disk], {})


def test_missing_asks_in_batches(key: BackupKey, client: VaultClient, vault: VaultDouble) -> None:
    ids = [chunk_id(key, str(i).encode()) for i in range(5000)]
    vault.chunks[ids[10]] = b"KSC1..."
    missing = client.missing([*ids, ids[0]])
    assert len(missing) == 4999 and ids[10] not in missing
    assert [p for m, p in vault.requests if p == "/v1/chunks/missing"] == ["/v1/chunks/missing"] * 2


def test_put_and_get_chunk(key: BackupKey, client: VaultClient, vault: VaultDouble) -> None:
    data = b"a chunk"
    cid = chunk_id(key, data)
    blob = seal(key.public(), data, cid)
    assert client.put_chunk(cid, blob) is True
    assert client.put_chunk(cid, seal(key.public(), data, cid)) is False
    assert client.get_chunk(cid) == blob  # first writer wins
    with pytest.raises(NotFound):
        client.get_chunk("0" * 64)
    with pytest.raises(InvalidSpec, match="not a chunk id"):
        client.get_chunk("../../etc/passwd")
    assert client.info()["chunk_size"] == CHUNK_SIZE


def test_tokens_and_roles(vault: VaultDouble, url: str, key: BackupKey) -> None:
    cid = chunk_id(key, b"x")
    with VaultClient(url, READER_TOKEN) as reader:
        assert reader.missing([cid]) == [cid]
        with pytest.raises(Forbidden):
            reader.put_chunk(cid, seal(key.public(), b"x"))
    with VaultClient(url, "wrong") as stranger, pytest.raises(Unauthorized):
        stranger.info()


def test_urls_are_checked() -> None:
    with pytest.raises(InvalidSpec, match="http only on loopback"):
        VaultClient("http://backup.example:8443", "t")
    with pytest.raises(InvalidSpec, match="fingerprint"):
        VaultClient("https://backup.example:8443", "t")
    with pytest.raises(InvalidSpec, match="not a SHA-256"):
        VaultClient("https://backup.example:8443", "t", fingerprint="abcd")
    VaultClient("http://[::1]:1", "t").close()
    VaultClient("https://backup.example:8443", "t", fingerprint="AB:" * 31 + "AB").close()


def test_transport_failures_are_one_line_errors() -> None:
    def timeout(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("slow", request=request)

    def refused(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("[Errno 111] Connection refused", request=request)

    with (
        VaultClient(URL, "t", timeout=2, transport=httpx.MockTransport(timeout)) as c,
        pytest.raises(OperationTimeout, match="no answer in 2 s"),
    ):
        c.info()
    with (
        VaultClient(URL, "t", transport=httpx.MockTransport(refused)) as c,
        pytest.raises(BackupServerUnavailable, match="not reachable"),
    ):
        c.get_chunk("0" * 64)


def test_an_oversized_chunk_is_not_read_whole() -> None:
    def huge(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=b"KSC1" + bytes(9 * MiB))

    with VaultClient(URL, "t", transport=httpx.MockTransport(huge)) as c, pytest.raises(BackupCorrupt, match="larger"):
        c.get_chunk("0" * 64)


async def test_usable_from_asyncio(key: BackupKey, client: VaultClient) -> None:
    disk = await asyncio.to_thread(backup_disk, client, key.public(), "emr-db", "disk0", io.BytesIO(b"y" * 10), 10)
    gen = await asyncio.to_thread(make_generation, client, key.public(), "emr-db", UUID, [disk], {})
    assert gen["generation"] == 1
