"""One contract for every Store: SqliteStore always, EtcdStore on a real 1-member etcd when installed."""

from __future__ import annotations

import asyncio
import shutil
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest

from kasou.errors import StoreConflict, StoreError
from kasou.lab.etcd import EtcdCluster, _free_ports
from kasou.store.base import Store
from kasou.store.etcd import EtcdStore, range_end
from kasou.store.sqlite import SqliteStore

Opener = Callable[[], Store]


@pytest.fixture(scope="session")
def etcd_endpoints(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[str]]:
    """A 1-member etcd for the whole session, stopped (by pid) at its end."""
    if shutil.which("etcd") is None:
        pytest.skip("etcd is not installed (apt-get install etcd-server)")
    cluster = EtcdCluster(tmp_path_factory.mktemp("etcd"), members=1)
    cluster.start()
    try:
        yield cluster.endpoints
    finally:
        cluster.stop()


# the etcd half: one member of its own per worker, no timing: beside the fast tests (scripts/test.sh)
@pytest.fixture(params=["sqlite", pytest.param("etcd", marks=[pytest.mark.etcd, pytest.mark.shares_machine])])
def open_store(request: pytest.FixtureRequest, tmp_path: Path) -> Opener:
    """Opens a store on the same backing data each time it is called (a file, or an etcd prefix)."""
    if request.param == "sqlite":
        return lambda: SqliteStore(tmp_path / "s.db")
    endpoints: list[str] = request.getfixturevalue("etcd_endpoints")
    prefix = f"/kasou-test/{uuid.uuid4().hex}/"  # every test its own namespace in the shared etcd
    return lambda: EtcdStore(endpoints, prefix=prefix, timeout=5.0)


@pytest.fixture
async def store(open_store: Opener) -> AsyncIterator[Store]:
    s = open_store()
    yield s
    await s.close()


async def test_empty(store: Store) -> None:
    assert await store.get("vms/a") is None
    assert await store.range("") == []
    assert await store.range("vms/") == []
    assert await store.delete("vms/a") is False
    assert await store.delete("vms/a", expect_rev=0) is False
    assert await store.delete("vms/a", expect_rev=7) is False
    assert await store.delete_prefix("vms/") == 0


async def test_create_and_conflict(store: Store) -> None:
    r1 = await store.create("vms/a", {"x": 1})
    assert r1 > 0
    with pytest.raises(StoreConflict) as exc:
        await store.create("vms/a", {"x": 2})
    assert isinstance(exc.value, StoreError)
    assert exc.value.details == {"key": "vms/a"}
    e = await store.get("vms/a")
    assert e is not None and e.key == "vms/a" and e.value == {"x": 1} and e.mod_rev == r1


async def test_put_revisions_increase(store: Store) -> None:
    r1 = await store.put("a", {"n": 1})
    r2 = await store.put("b", {"n": 2})
    r3 = await store.put("a", {"n": 3})
    assert 0 < r1 < r2 < r3
    a, b = await store.get("a"), await store.get("b")
    assert a is not None and a.value == {"n": 3} and a.mod_rev == r3
    assert b is not None and b.value == {"n": 2} and b.mod_rev == r2


async def test_compare_and_swap(store: Store) -> None:
    r1 = await store.put("k", {"v": 1}, expect_rev=0)
    r2 = await store.put("k", {"v": 2}, expect_rev=r1)
    assert r2 > r1
    for stale in (r1, 0, r2 + 1000):
        with pytest.raises(StoreConflict):
            await store.put("k", {"v": "lost"}, expect_rev=stale)
    with pytest.raises(StoreConflict):
        await store.put("missing", {"v": 1}, expect_rev=r2)  # positive expect_rev: it must exist
    assert await store.get("missing") is None
    e = await store.get("k")
    assert e is not None and e.value == {"v": 2} and e.mod_rev == r2


async def test_concurrent_creates_one_wins(store: Store) -> None:
    results = await asyncio.gather(*(store.create("lock", {"owner": i}) for i in range(8)), return_exceptions=True)
    wins = [r for r in results if isinstance(r, int)]
    assert len(wins) == 1
    assert all(isinstance(r, StoreConflict) for r in results if not isinstance(r, int))


async def test_concurrent_cas_increments_are_not_lost(store: Store) -> None:
    await store.create("counter", {"n": 0})

    async def bump() -> None:
        while True:
            e = await store.get("counter")
            assert e is not None
            try:
                await store.put("counter", {"n": e.value["n"] + 1}, expect_rev=e.mod_rev)
                return
            except StoreConflict:
                await asyncio.sleep(0)

    await asyncio.gather(*(bump() for _ in range(10)))
    e = await store.get("counter")
    assert e is not None and e.value == {"n": 10}


async def test_range_prefix_and_order(store: Store) -> None:
    keys = ["vms/b", "vmr", "vms/a/disk", "vmsx", "vms", "vms/", "vms0", "vms/a", "vms/A", "hosts/h1"]
    revs = {k: await store.put(k, {"k": k}) for k in keys}
    got = await store.range("vms/")
    assert [e.key for e in got] == ["vms/", "vms/A", "vms/a", "vms/a/disk", "vms/b"]
    assert all(e.value == {"k": e.key} and e.mod_rev == revs[e.key] for e in got)
    assert [e.key for e in await store.range("")] == sorted(keys)
    assert [e.key for e in await store.range("vms/a")] == ["vms/a", "vms/a/disk"]
    assert [e.key for e in await store.range("hosts/h1")] == ["hosts/h1"]
    assert await store.range("nothing/") == []


async def test_delete(store: Store) -> None:
    r1 = await store.create("k", {"v": 1})
    r2 = await store.put("k", {"v": 2})
    with pytest.raises(StoreConflict):
        await store.delete("k", expect_rev=r1)
    with pytest.raises(StoreConflict):
        await store.delete("k", expect_rev=0)
    assert await store.get("k") is not None
    assert await store.delete("k", expect_rev=r2) is True
    assert await store.get("k") is None
    assert await store.delete("k", expect_rev=r2) is False
    await store.put("k", {"v": 3})
    assert await store.delete("k") is True
    assert await store.delete("k") is False
    # a delete makes room for a create
    assert await store.create("k", {"v": 4}) > r2


async def test_delete_prefix(store: Store) -> None:
    for k in ("vms/a", "vms/b", "vms/b/disk", "vmsx", "vms", "hosts/h1"):
        await store.put(k, {})
    assert await store.delete_prefix("vms/") == 3
    assert [e.key for e in await store.range("")] == ["hosts/h1", "vms", "vmsx"]
    assert await store.delete_prefix("vms/") == 0
    assert await store.delete_prefix("") == 3
    assert await store.range("") == []


async def test_unicode_and_nested_values(store: Store) -> None:
    value = {
        "name": "患者記録",
        "ward": "Kardiologie \u2013 Station 3 ü",
        "emoji": "🩺",
        "nested": {"list": [1, "ä", None, True, 1.5, {"deep": '\u00e9\n\t"quote"'}]},
        "empty": {},
    }
    await store.put("vms/病院", value)
    e = await store.get("vms/病院")
    assert e is not None and e.key == "vms/病院" and e.value == value
    assert [x.key for x in await store.range("vms/")] == ["vms/病院"]
    await store.put("empty", {})
    e = await store.get("empty")
    assert e is not None and e.value == {}


async def test_reopen(open_store: Opener) -> None:
    s = open_store()
    r = await s.put("k", {"v": "一"})
    await s.create("vms/a", {"state": "running"})
    await s.close()
    s2 = open_store()
    try:
        e = await s2.get("k")
        assert e is not None and e.value == {"v": "一"} and e.mod_rev == r
        assert [x.key for x in await s2.range("vms/")] == ["vms/a"]
        with pytest.raises(StoreConflict):
            await s2.create("vms/a", {})
        assert await s2.put("k", {"v": 2}, expect_rev=r) > r
    finally:
        await s2.close()


# -- EtcdStore details that need no etcd ---------------------------------------------------------------


def test_range_end() -> None:
    assert range_end(b"/kasou/") == b"/kasou0"
    assert range_end(b"a") == b"b"
    assert range_end(b"a\xff") == b"b"
    assert range_end(b"a\xfe\xff\xff") == b"a\xff"
    assert range_end(b"\xff\xff") == b"\0"
    assert range_end(b"") == b"\0"


async def test_no_endpoint_answers_is_a_bounded_store_error() -> None:
    dead = [f"http://127.0.0.1:{p}" for p in _free_ports(2)]
    s = EtcdStore(dead, timeout=2.0)
    t0 = time.monotonic()
    try:
        with pytest.raises(StoreError) as exc:
            await s.get("k")
        with pytest.raises(StoreError):
            await s.put("k", {})
    finally:
        await s.close()
    assert time.monotonic() - t0 < 4
    message = str(exc.value)
    assert "\n" not in message and all(d in message for d in dead)


def test_etcd_cluster_without_etcd(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr("kasou.lab.etcd.shutil.which", lambda name: None)
    with pytest.raises(StoreError, match="etcd is not installed"):
        EtcdCluster(tmp_path / "etcd", members=1).start()
