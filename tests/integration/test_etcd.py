"""EtcdStore on a real 3-member etcd cluster on loopback: failover, quorum loss, leases, election.

Each test starts its own cluster (about 3 s) and stops it, by pid, in the fixture's teardown.
"""

from __future__ import annotations

import asyncio
import shutil
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest

from kasou import pki
from kasou.agent import guard as guard_mod
from kasou.agent.guard import HostGuard
from kasou.config import HaTimes, Paths, TlsFiles
from kasou.errors import StoreConflict, StoreError
from kasou.lab.etcd import EtcdCluster
from kasou.store.etcd import EtcdStore

pytestmark = pytest.mark.etcd

TIMEOUT = 2.0


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[EtcdCluster]:
    if shutil.which("etcd") is None:
        pytest.skip("etcd is not installed (apt-get install etcd-server)")
    c = EtcdCluster(tmp_path / "etcd", members=3)
    c.start(timeout=30)
    pids = [p for p in c.pids if p is not None]
    try:
        yield c
    finally:
        c.stop()
        assert not any(_alive(p) for p in pids), "an etcd member outlived stop()"
        assert not c.data_dir.exists()


@pytest.fixture
async def store(cluster: EtcdCluster) -> AsyncIterator[EtcdStore]:
    s = EtcdStore(cluster.endpoints, timeout=TIMEOUT)
    yield s
    await s.close()


def leader_index(cluster: EtcdCluster) -> int:
    """Which member leads now, from each member's own status."""
    with httpx.Client(timeout=2) as c:
        for i, url in enumerate(cluster.endpoints):
            st = c.post(f"{url}/v3/maintenance/status", json={}).json()
            if st["leader"] == st["header"]["member_id"]:
                return i
    raise AssertionError("no etcd member says it leads")


async def test_store_on_three_members(cluster: EtcdCluster, store: EtcdStore) -> None:
    assert len(cluster.endpoints) == 3 and all(p is not None for p in cluster.pids)
    r = await store.create("vms/a", {"state": "running"})
    # every member serves the same data (linearizable reads)
    for url in cluster.endpoints:
        one = EtcdStore([url], timeout=TIMEOUT)
        try:
            e = await one.get("vms/a")
            assert e is not None and e.value == {"state": "running"} and e.mod_rev == r
        finally:
            await one.close()
    # prefixes isolate: another namespace sees nothing of this one
    other = EtcdStore(cluster.endpoints, prefix="/other/", timeout=TIMEOUT)
    try:
        assert await other.range("") == []
    finally:
        await other.close()


async def test_follower_lost_is_invisible_quorum_lost_is_a_bounded_error(
    cluster: EtcdCluster, store: EtcdStore
) -> None:
    rev = await store.put("vms/a", {"n": 0})
    lead = leader_index(cluster)
    first, second = (i for i in range(3) if i != lead)
    cluster.kill(first)
    t0 = time.monotonic()
    for n in range(1, 6):
        rev = await store.put("vms/a", {"n": n}, expect_rev=rev)
    await store.create("vms/b", {})
    assert [e.key for e in await store.range("vms/")] == ["vms/a", "vms/b"]
    e = await store.get("vms/a")
    assert e is not None and e.value == {"n": 5} and e.mod_rev == rev
    assert await store.delete("vms/b") is True
    assert await store.delete_prefix("nothing/") == 0
    assert time.monotonic() - t0 < 2, "losing a follower cost time"

    # lose a second member: no quorum, so writes and (linearizable) reads fail within the timeout
    cluster.kill(second)
    bound = 3 * TIMEOUT + 1  # one attempt per endpoint at most
    for op in (
        lambda: store.put("vms/a", {"n": 6}),
        lambda: store.put("vms/a", {"n": 6}, expect_rev=rev),
        lambda: store.create("vms/c", {}),
        lambda: store.get("vms/a"),
    ):
        t0 = time.monotonic()
        with pytest.raises(StoreError) as exc:
            await op()
        assert time.monotonic() - t0 < bound
        assert "\n" not in str(exc.value)
        assert not isinstance(exc.value, StoreConflict)


async def test_leader_lost_is_absorbed_by_a_retry(cluster: EtcdCluster) -> None:
    # A follower loses requests it forwarded to a dead leader (etcd answers them after 7 s);
    # with a timeout above the election time, the retry on the next member succeeds.
    timeout = 3.0
    store = EtcdStore(cluster.endpoints, timeout=timeout)
    try:
        rev = await store.put("vms/a", {"n": 0})
        cluster.kill(leader_index(cluster))
        t0 = time.monotonic()
        rev = await store.put("vms/a", {"n": 1}, expect_rev=rev)  # compare-and-swap, retried
        rev = await store.put("vms/a", {"n": 2}, expect_rev=rev)
        assert await store.put("vms/b", {}) > rev
        e = await store.get("vms/a")
        assert e is not None and e.value == {"n": 2}
        await store.create("vms/c", {})
        assert [x.key for x in await store.range("vms/")] == ["vms/a", "vms/b", "vms/c"]
        assert time.monotonic() - t0 < 3 * timeout
    finally:
        await store.close()


async def test_lease_keepalive_and_expiry(store: EtcdStore) -> None:
    kept = await store.grant_lease(2)
    lost = await store.grant_lease(2)
    await store.put("hosts/kept", {"alive": True}, lease=kept)
    await store.put("hosts/lost", {"alive": True}, lease=lost)
    assert await store.keepalive(lost) >= 2

    # 'kept' is renewed every 0.5 s, 'lost' never again: after its TTL, etcd deletes its key
    t0 = time.monotonic()
    while await store.get("hosts/lost") is not None:
        assert time.monotonic() - t0 < 10, "a key under an expired lease is still there"
        assert await store.keepalive(kept) > 0
        await asyncio.sleep(0.5)
    assert time.monotonic() - t0 > 1
    assert await store.get("hosts/kept") is not None
    with pytest.raises(StoreError, match="expired"):
        await store.keepalive(lost)

    # revoking deletes the lease's keys at once; revoking twice is fine
    await store.revoke(kept)
    assert await store.get("hosts/kept") is None
    await store.revoke(kept)
    with pytest.raises(StoreError):
        await store.put("hosts/x", {}, lease=kept)
    assert await store.get("hosts/x") is None


async def test_campaign(cluster: EtcdCluster) -> None:
    # two candidates, each with its own store talking to a different member first
    a = EtcdStore(cluster.endpoints, timeout=TIMEOUT)
    b = EtcdStore(cluster.endpoints[::-1], timeout=TIMEOUT)
    try:
        la, lb = await a.grant_lease(5), await b.grant_lease(5)
        assert await a.leader("control") is None
        assert await a.campaign("control", "host-a", la) is True
        assert await b.campaign("control", "host-b", lb) is False
        assert await a.campaign("control", "host-a", la) is True  # retried campaign: still leader
        assert await b.campaign("control", "host-a", lb) is False  # a name alone does not lead
        assert await b.leader("control") == "host-a"
        assert await b.campaign("other", "host-b", lb) is True  # elections are independent
        await a.revoke(la)
        assert await b.leader("control") is None
        assert await b.campaign("control", "host-b", lb) is True
        assert await a.leader("control") == "host-b"
        # the election key is an ordinary JSON entry under the prefix
        e = await a.get("election/control")
        assert e is not None and e.value == {"leader": "host-b"}
    finally:
        await a.close()
        await b.close()


async def test_two_members_restarted_together_never_make_the_guard_fence(cluster: EtcdCluster, tmp_path: Path) -> None:
    """Quorum lost, then both dead members restarted at once (power back in the server room).

    Their client ports accept connections but answer nothing until they have joined a working
    cluster; their metrics listeners say "no leader" at once. So the guard's proof of quorum loss
    goes on until a leader exists, and its deadline stays TTL minus margin ahead of the last proof.
    """
    paths = Paths(home=tmp_path / "home", images=tmp_path / "images")
    paths.ensure()
    times = HaTimes(6, 2)
    store = EtcdStore(cluster.endpoints, timeout=times.renew_every_s)
    g = HostGuard(store, "h1", paths, times, lambda: {"agent_url": "http://x"}, metrics=cluster.metrics_urls)
    slack: list[float] = []  # how far ahead the fence deadline was, every 0.1 s

    async def renew() -> None:
        while True:
            await g.renew_once()
            await asyncio.sleep(times.renew_every_s if g.renewed else guard_mod.RETRY_AFTER_FAILURE_S)

    async def watch() -> None:
        while True:
            with g._lock:
                deadline = g._deadline
            slack.append(-1.0 if deadline is None else deadline - time.monotonic())
            await asyncio.sleep(0.1)

    await g.renew_once()
    tasks = [asyncio.create_task(renew()), asyncio.create_task(watch())]
    try:
        cluster.kill(0)
        cluster.kill(1)
        await asyncio.sleep(times.lease_ttl_s + 2)  # longer than the TTL: only the proof holds the fence
        assert min(slack) > 0
        await asyncio.to_thread(cluster.start, 30, [0, 1])
        await asyncio.sleep(2)
        assert g.renewed and await store.keepalive(g.lease or 0) > 0
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await store.close()
    print(f"guard deadline ahead of now: min {min(slack):.2f} s over {len(slack)} looks")
    assert min(slack) > 1.0, "the guard came within a second of fencing"


async def test_a_restarting_member_says_no_leader_on_its_metrics_listener(cluster: EtcdCluster) -> None:
    assert await guard_mod.probe_member(cluster.endpoints[0], cluster.metrics_urls[0]) == "unknown"  # has a leader
    cluster.kill(0)
    cluster.kill(1)
    assert await guard_mod.probe_member(cluster.endpoints[0], cluster.metrics_urls[0]) == "dead"
    t0 = time.monotonic()
    while await guard_mod.probe_member(cluster.endpoints[2], cluster.metrics_urls[2]) != "no-leader":
        assert time.monotonic() - t0 < 10, "the survivor still says it has a leader"
        await asyncio.sleep(0.2)


async def test_etcd_over_mutual_tls_takes_only_the_sites_hosts(tmp_path: Path) -> None:
    if shutil.which("etcd") is None:
        pytest.skip("etcd is not installed (apt-get install etcd-server)")
    pki.init_ca(tmp_path / "ca", "test site")
    pki.issue(tmp_path / "ca", "etcd", ["127.0.0.1"], [], tmp_path / "etcd-tls")
    pki.issue(tmp_path / "ca", "h1", ["127.0.0.1"], [], tmp_path / "h1")
    pki.init_ca(tmp_path / "other-ca", "another site")
    pki.issue(tmp_path / "other-ca", "h9", ["127.0.0.1"], [], tmp_path / "h9")
    ca = tmp_path / "ca" / "ca.crt"
    etcd_tls = TlsFiles(ca=ca, cert=tmp_path / "etcd-tls" / "host.crt", key=tmp_path / "etcd-tls" / "host.key")
    cluster = EtcdCluster(tmp_path / "data", members=1, tls=etcd_tls)
    cluster.start(timeout=30)
    try:
        assert all(u.startswith("https://") for u in [*cluster.endpoints, *cluster.metrics_urls])
        h1 = pki.client_context(ca, tmp_path / "h1" / "host.crt", tmp_path / "h1" / "host.key")
        store = EtcdStore(cluster.endpoints, timeout=TIMEOUT, tls=h1)
        try:
            await store.put("vms/a", {"n": 1})
            e = await store.get("vms/a")
            assert e is not None and e.value == {"n": 1}
            assert await guard_mod._probe_metrics(cluster.metrics_urls[0], h1) == "unknown"  # it has a leader
        finally:
            await store.close()
        for who, ctx in (
            ("no client certificate", pki.client_context(ca)),
            (
                "another CA's certificate",
                pki.client_context(ca, tmp_path / "h9" / "host.crt", tmp_path / "h9" / "host.key"),
            ),
        ):
            bad = EtcdStore(cluster.endpoints, timeout=TIMEOUT, tls=ctx)
            try:
                with pytest.raises(StoreError):
                    await bad.get("vms/a")
            finally:
                await bad.close()
            print(f"etcd refuses a client with {who}")
        with pytest.raises(StoreError, match="TLS files"):
            EtcdStore(cluster.endpoints)
    finally:
        cluster.stop()
