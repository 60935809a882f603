"""The watch half of the store contract: every test runs on SqliteStore and on EtcdStore (a real 1-member etcd,
marked etcd), with the fixtures of the store contract (tests/unit/test_store_contract.py).

A watch delivers the puts and deletes under its prefix only, in revision order, from the moment it starts;
changes written by another store instance and by another process show too; leaving it (or cancelling the
task that iterates it) ends it and leaves no task, registration or connection behind.
"""

# ruff: noqa: F811 - the store contract's fixtures, imported, are the parameters of these tests

from __future__ import annotations

import asyncio
import itertools
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from kasou.lab.etcd import EtcdCluster
from kasou.store import sqlite as sqlite_module
from kasou.store.base import Store, Watch, WatchEvent
from kasou.store.etcd import EtcdStore
from kasou.store.etcdwatch import EtcdWatch
from kasou.store.sqlite import SqliteStore
from tests.unit.test_store_contract import Opener, etcd_endpoints, open_store, store  # noqa: F401 - fixtures

BOUND_S = 5.0  # every wait of these tests


async def take(watch: Watch, n: int) -> list[WatchEvent]:
    """The next ``n`` events of ``watch``, within BOUND_S."""
    out: list[WatchEvent] = []
    async with asyncio.timeout(BOUND_S):
        while len(out) < n:
            out.append(await anext(watch))
    return out


async def nothing_more(watch: Watch, within: float = 0.8) -> None:
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(within):
            event = await anext(watch)
            pytest.fail(f"an event that should not be: {event}")


def brief(events: list[WatchEvent]) -> list[tuple[str, str, object]]:
    return [(e.kind, e.key, e.value) for e in events]


async def test_puts_and_deletes_under_the_prefix_only_in_order(store: Store) -> None:
    await store.put("vms/before", {"n": 0})  # before the watch started: not delivered
    async with store.watch("vms/") as w:
        r1 = await store.put("vms/a", {"n": 1})
        await store.put("vmsx", {"n": 9})  # beside the prefix
        await store.put("hosts/h1", {"n": 9})
        r2 = await store.create("vms/b", {"n": 2})
        r3 = await store.put("vms/a", {"n": 3}, expect_rev=r1)
        assert await store.delete("vms/b", expect_rev=r2)
        await store.put("vms/c/disk", {"n": 4})
        assert await store.delete_prefix("vms/") == 3  # before, a, c/disk: one revision, an event each
        events = await take(w, 8)
        assert brief(events[:5]) == [
            ("put", "vms/a", {"n": 1}),
            ("put", "vms/b", {"n": 2}),
            ("put", "vms/a", {"n": 3}),
            ("delete", "vms/b", None),
            ("put", "vms/c/disk", {"n": 4}),
        ]
        assert sorted(brief(events[5:])) == [
            ("delete", "vms/a", None),
            ("delete", "vms/before", None),
            ("delete", "vms/c/disk", None),
        ]
        assert [e.revision for e in events[:3]] == [r1, r2, r3]
        assert all(a.revision < b.revision for a, b in itertools.pairwise(events[:6]))
        assert events[5].revision == events[6].revision == events[7].revision
        await nothing_more(w)


async def test_many_watchers_and_writers(store: Store, open_store: Opener) -> None:
    other = open_store()  # a second instance on the same data, as a second control-plane process would have
    try:
        async with store.watch("vms/") as w1, other.watch("vms/a") as w2:
            await other.put("vms/a", {"by": "other"})
            await store.put("vms/b", {"by": "store"})
            await store.put("vms/ab", {"by": "store"})
            assert brief(await take(w1, 3)) == [
                ("put", "vms/a", {"by": "other"}),
                ("put", "vms/b", {"by": "store"}),
                ("put", "vms/ab", {"by": "store"}),
            ]
            assert brief(await take(w2, 2)) == [("put", "vms/a", {"by": "other"}), ("put", "vms/ab", {"by": "store"})]
    finally:
        await other.close()


def write_from_another_process(store: Store, key: str) -> float:
    """``store.put(key, {"by": "process"})`` from a separate Python process, as a second kasou would; when
    (``time.time()``) the put returned there."""
    if isinstance(store, SqliteStore):
        opener = f"SqliteStore({store.path!r})"
    else:
        assert isinstance(store, EtcdStore)
        opener = f"EtcdStore({store.endpoints!r}, prefix={store.prefix!r})"
    code = (
        "import asyncio, time\n"
        "from kasou.store.etcd import EtcdStore\n"
        "from kasou.store.sqlite import SqliteStore\n"
        "async def main():\n"
        f"    s = {opener}\n"
        f"    await s.put({key!r}, {{'by': 'process'}})\n"
        "    print(time.time(), flush=True)\n"
        "    await s.close()\n"
        "asyncio.run(main())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, timeout=30, env=os.environ.copy(),
                         capture_output=True, text=True)  # fmt: skip
    return float(out.stdout.split()[-1])


async def test_a_change_by_another_process_shows(store: Store) -> None:
    async with store.watch("vms/") as w:
        writing = asyncio.create_task(asyncio.to_thread(write_from_another_process, store, "vms/remote"))
        [event] = await take(w, 1)
        seen = time.time()  # wall clock: the writer's is another process's
        written = await writing
    assert (event.kind, event.key, event.value) == ("put", "vms/remote", {"by": "process"})
    print(f"\n{type(store).__name__}: a put by another process seen {(seen - written) * 1000:.1f} ms after it returned")
    # SQLite: another process's commit is noticed by PRAGMA data_version within POLL_S; etcd streams it at once
    assert seen - written < sqlite_module.POLL_S + 1.0


async def test_cancelling_the_iterating_task_ends_the_watch_cleanly(store: Store) -> None:
    before = asyncio.all_tasks()
    got: list[WatchEvent] = []
    entered = asyncio.Event()

    async def follow() -> None:
        async with store.watch("vms/") as w:
            entered.set()
            async for e in w:
                got.append(e)

    task = asyncio.create_task(follow())
    async with asyncio.timeout(BOUND_S):
        await entered.wait()
    await store.put("vms/a", {})
    async with asyncio.timeout(BOUND_S):
        while not got:
            await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.sleep(0)
    assert asyncio.all_tasks() - before == set(), "a task of the watch outlived it"
    assert [e.key for e in got] == ["vms/a"]
    if isinstance(store, SqliteStore):
        assert sqlite_module.registered(store.path) == 0, "the watcher is still registered"
    await store.put("vms/b", {})  # the store goes on as before


async def test_a_closed_watch_ends_iteration_and_holds_nothing(store: Store) -> None:
    w = store.watch("vms/")
    async with w:
        await store.put("vms/a", {"n": 1})
        assert brief(await take(w, 1)) == [("put", "vms/a", {"n": 1})]
    await w.close()  # idempotent
    await store.put("vms/b", {"n": 2})
    async with asyncio.timeout(BOUND_S):
        assert [e async for e in w] == []
    if isinstance(w, EtcdWatch):
        assert w.endpoint is None
    if isinstance(store, SqliteStore):
        assert sqlite_module.registered(store.path) == 0


async def test_watches_while_other_tasks_write(store: Store) -> None:
    """Writers in several tasks: each key's changes arrive in the order written, none lost, none twice."""

    async def writer(i: int) -> None:
        for n in range(10):
            await store.put(f"vms/w{i}", {"n": n})

    async with store.watch("vms/") as w:
        t0 = time.monotonic()
        await asyncio.gather(*(writer(i) for i in range(4)))
        events = await take(w, 40)
        took = time.monotonic() - t0
        await nothing_more(w, 0.3)
    print(f"\n{type(store).__name__}: 40 puts from 4 tasks written and all seen by the watch in {took * 1000:.0f} ms")
    revisions = [e.revision for e in events]
    assert revisions == sorted(revisions) and len(set(revisions)) == 40
    for i in range(4):
        assert [e.value for e in events if e.key == f"vms/w{i}"] == [{"n": n} for n in range(10)]


# -- falling behind the kept history: resync ---------------------------------------------------------------


async def test_sqlite_watcher_behind_the_trimmed_log_is_told_to_resync(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sqlite_module, "HISTORY", 8)
    monkeypatch.setattr(sqlite_module, "TRIM_EVERY", 4)
    s = SqliteStore(f"{tmp_path}/s.db")
    try:
        async with s.watch("vms/") as w:
            for n in range(40):  # the watcher reads nothing meanwhile: the log is trimmed past it
                await s.put("vms/a", {"n": n})
            [first] = await take(w, 1)
            assert first.kind == "resync" and first.revision == 40
            await s.put("vms/a", {"n": "after"})
            assert brief(await take(w, 1)) == [("put", "vms/a", {"n": "after"})]
    finally:
        await s.close()


@pytest.mark.etcd
async def test_etcd_watch_from_a_compacted_revision_is_told_to_resync(etcd_endpoints: list[str]) -> None:
    s = EtcdStore(etcd_endpoints, prefix="/kasou-test/compact/", timeout=5.0)
    try:
        old = await s.put("vms/a", {"n": 0})
        latest = await s.put("vms/a", {"n": 1})
        async with httpx.AsyncClient(timeout=5) as c:
            r = await c.post(f"{etcd_endpoints[0]}/v3/kv/compaction", json={"revision": str(latest)})
            assert r.status_code == 200, r.text
        w = EtcdWatch(s, "vms/")
        w.next_rev = old  # resume from a revision compacted away
        async with w:
            first, second = await take(w, 2)
            assert first.kind == "resync" and first.revision == latest
            assert (second.kind, second.key, second.value) == ("put", "vms/a", {"n": 1})
            await s.put("vms/a", {"n": 2})
            assert brief(await take(w, 1)) == [("put", "vms/a", {"n": 2})]
    finally:
        await s.close()


@pytest.mark.etcd
async def test_etcd_watch_goes_on_when_its_member_dies(tmp_path: Path) -> None:
    """A 3-member etcd: the member the watch streams from is killed; the watch opens again on another from the
    revision after the last event it delivered, and nothing is lost or repeated."""
    cluster = EtcdCluster(tmp_path / "etcd", members=3)
    cluster.start()
    s = EtcdStore(cluster.endpoints, timeout=3.0)
    try:
        async with EtcdWatch(s, "vms/", idle_s=1.0) as w:
            await s.put("vms/a", {"n": 1})
            assert brief(await take(w, 1)) == [("put", "vms/a", {"n": 1})]
            assert w.endpoint is not None
            lost = cluster.endpoints.index(w.endpoint)
            cluster.kill(lost)
            t0 = time.monotonic()
            await s.put("vms/a", {"n": 2})
            await s.put("vms/b", {"n": 3})
            async with asyncio.timeout(20):
                events = [await anext(w), await anext(w)]
            took = time.monotonic() - t0
            assert brief(events) == [("put", "vms/a", {"n": 2}), ("put", "vms/b", {"n": 3})]
            now_on = w.endpoint
            assert now_on is not None and now_on != cluster.endpoints[lost]
            await nothing_more(w, 0.5)
        print(f"\netcd watch: member {lost} killed, the next changes seen {took:.2f} s later, from {now_on}")
    finally:
        await s.close()
        cluster.stop()
