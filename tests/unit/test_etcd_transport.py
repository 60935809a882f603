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
