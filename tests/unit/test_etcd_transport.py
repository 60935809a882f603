"""How the etcd store reads a TLS failure: a refused client certificate is a clean refusal (StoreError,
"not sent"), never a raw ssl.SSLError (seen under TLS 1.3, where the refusal arrives on the first read)."""

from __future__ import annotations

import ssl

import httpx
import pytest

from kasou.errors import StoreError
from kasou.store.etcd import EtcdStore


def refusing(reason: str) -> httpx.MockTransport:
    def handler(request: httpx.Request) -> httpx.Response:
        e = ssl.SSLError(1, f"[SSL: {reason}] sslv3 alert bad certificate")
        e.reason = reason
        raise e

    return httpx.MockTransport(handler)


@pytest.mark.parametrize("reason", ["SSLV3_ALERT_BAD_CERTIFICATE", "DECRYPTION_FAILED_OR_BAD_RECORD_MAC"])
async def test_a_tls_failure_is_a_store_error(reason: str) -> None:
    store = EtcdStore(["http://127.0.0.1:1", "http://127.0.0.1:2"], timeout=2)
    store._client = httpx.AsyncClient(transport=refusing(reason))
    try:
        with pytest.raises(StoreError, match=reason):
            await store.get("vms/a")
    finally:
        await store.close()


async def test_endpoints_are_learnt_from_the_member_list_and_a_removed_member_dropped(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The first host of a cluster is configured with its own member only; it learns the others' client URLs
    (as etcd's client auto-sync), and forgets a removed member's."""
    members = [["http://10.0.0.1:2379"], ["http://10.0.0.2:2379"], ["https://10.0.0.3:2379"]]
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(f"{request.url.host} {request.url.path}")
        if request.url.path.endswith("/cluster/member/list"):
            return httpx.Response(200, json={"members": [{"ID": str(i + 1), "clientURLs": u}
                                                          for i, u in enumerate(members)]})  # fmt: skip
        return httpx.Response(200, json={"header": {"revision": "1"}})

    store = EtcdStore(["http://10.0.0.1:2379"], timeout=2)
    store._client = httpx.AsyncClient(transport=httpx.MockTransport(handler))
    try:
        assert await store.get("vms/a") is None
        assert store.endpoints == ["http://10.0.0.1:2379", "http://10.0.0.2:2379"]  # not another scheme's
        assert seen == ["10.0.0.1 /v3/kv/range", "10.0.0.1 /v3/cluster/member/list"]
        await store.get("vms/a")
        assert len(seen) == 3  # not again before SYNC_EVERY_S
        del members[1]
        monkeypatch.setattr("kasou.store.etcd.SYNC_EVERY_S", 0.0)
        await store.get("vms/a")
        assert store.endpoints == ["http://10.0.0.1:2379"]
    finally:
        await store.close()
