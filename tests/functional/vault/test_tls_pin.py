"""The pinned certificate on real TLS sockets (uvicorn on 127.0.0.1 with a self-signed certificate, as
``kasou backup-server init`` makes): the right fingerprint connects, any other is refused before a request
(and its token) is sent."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from kasou.vault.client import BackupServerUnavailable, CertificateMismatch, VaultClient, backup_disk, pinned_context
from kasou.vault.crypt import BackupKey
from tests.doubles.vault import WRITER_TOKEN, VaultDouble, create_vault_double, self_signed, serve


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[VaultDouble, str, str, str]]:
    """(double, URL, its certificate's fingerprint, another certificate's fingerprint)."""
    tmp = tmp_path_factory.mktemp("vault-tls")
    cert, key, fingerprint = self_signed(tmp / "server")
    _, _, other = self_signed(tmp / "impostor")
    double = VaultDouble()
    with serve(create_vault_double(double), tls=(cert, key)) as url:
        yield double, url, fingerprint, other


def test_the_pinned_certificate_connects(tls_server: tuple[VaultDouble, str, str, str]) -> None:
    double, url, fingerprint, _ = tls_server
    double.reset()
    colons = ":".join(fingerprint[i : i + 2] for i in range(0, 64, 2)).upper()  # as `show` may print it
    for pin in (fingerprint, colons):
        with VaultClient(url, WRITER_TOKEN, fingerprint=pin) as client:
            assert client.info()["chunk_size"] == 4 * 1024 * 1024
            disk = backup_disk(client, BackupKey.generate().public(), "emr-db", "disk0", io.BytesIO(b"z" * 99), 99)
            assert disk["chunks_sent"] == 1


def test_another_certificate_is_refused_before_anything_is_sent(tls_server: tuple[VaultDouble, str, str, str]) -> None:
    double, url, fingerprint, other = tls_server
    double.reset()
    with VaultClient(url, WRITER_TOKEN, fingerprint=other) as client:
        with pytest.raises(CertificateMismatch) as e:
            client.info()
        assert fingerprint in e.value.message and other in e.value.message and "\n" not in e.value.message
        with pytest.raises(CertificateMismatch):  # every connection is checked, not only the first
            client.get_chunk("0" * 64)
    assert double.requests == []


def test_plain_http_to_a_tls_server_fails_in_one_line(
    tls_server: tuple[VaultDouble, str, str, str], tmp_path: Path
) -> None:
    _, url, _, _ = tls_server
    with VaultClient(url.replace("https:", "http:"), WRITER_TOKEN) as client, pytest.raises(BackupServerUnavailable):
        client.info()


async def test_the_pin_holds_for_asyncio_streams_too(tls_server: tuple[VaultDouble, str, str, str]) -> None:
    """httpx's async transport does TLS over a memory BIO (``SSLObject``): the pin is checked there as well."""
    double, url, fingerprint, other = tls_server
    double.reset()
    async with httpx.AsyncClient(verify=pinned_context(fingerprint), trust_env=False) as ok:
        assert (await ok.get(url + "/v1/info")).status_code == 401  # reached the server (no token given)
    async with httpx.AsyncClient(verify=pinned_context(other), trust_env=False) as wrong:
        with pytest.raises(httpx.ConnectError, match="not the pinned"):
            await wrong.get(url + "/v1/info")
    assert double.requests == []
