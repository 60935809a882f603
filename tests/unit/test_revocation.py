"""Revoked certificates: the list the site CA signs, the check of a peer's serial, and the cache that keeps a
request from waiting on a slow store."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from kasou import pki
from kasou.errors import StoreError
from kasou.peers import KasouPeers, revoked_cache


def test_the_list_names_the_revoked_serials_and_is_signed_by_the_site_ca(tmp_path: Path) -> None:
    pki.init_ca(tmp_path / "ca", "site")
    pki.init_ca(tmp_path / "other", "another site")
    cert, _ = pki.issue(tmp_path / "ca", "h2", ["10.0.0.12"], [], tmp_path / "h2")
    serial = pki.serial_of(cert.read_bytes())
    crl = pki.make_crl(tmp_path / "ca", [serial, 7, 7], 3)
    ca = (tmp_path / "ca" / "ca.crt").read_bytes()
    assert pki.crl_serials(crl, ca) == {serial, 7}
    assert pki.crl_serials(pki.make_crl(tmp_path / "ca", [], 1), ca) == set()
    with pytest.raises(pki.TlsError, match="not signed by the site CA"):
        pki.crl_serials(crl, (tmp_path / "other" / "ca.crt").read_bytes())
    assert pki.peer_of(cert.read_bytes()).serial == serial
    assert pki.not_after_of(cert.read_bytes()) > 0


def _scope(pem: bytes) -> dict[str, Any]:
    return {"type": "http", "headers": [], "extensions": {"tls": {"client_cert_chain": [pem.decode()]}}}


def test_a_revoked_kasou_host_is_refused_even_with_the_marker(tmp_path: Path) -> None:
    pki.init_ca(tmp_path / "ca", "site")
    gone, _ = pki.issue(tmp_path / "ca", "h2", ["10.0.0.12"], [], tmp_path / "h2")
    kept, _ = pki.issue(tmp_path / "ca", "h3", ["10.0.0.13"], [], tmp_path / "h3")
    revoked = {pki.serial_of(gone.read_bytes())}

    async def known() -> list[str]:
        return []

    async def serials() -> set[int]:
        return revoked

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    peers = KasouPeers(app, known, revoked=serials)

    async def call(pem: bytes) -> tuple[int, bytes]:
        sent: list[dict[str, Any]] = []

        async def send(m: dict[str, Any]) -> None:
            sent.append(m)

        await peers(_scope(pem), None, send)
        return int(sent[0]["status"]), sent[1]["body"]

    status, body = asyncio.run(call(gone.read_bytes()))
    assert status == 403 and "was revoked" in json.loads(body)["message"]
    assert asyncio.run(call(kept.read_bytes())) == (200, b"ok")


def test_the_cache_reads_in_the_background_after_the_first_read() -> None:
    reads: list[int] = []
    answers: list[set[int] | Exception] = [{1}, StoreError("etcd has no leader"), {1, 2}]

    async def read() -> set[int]:
        reads.append(1)
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        await asyncio.sleep(0.05)
        return answer

    async def run() -> list[set[int]]:
        serials = revoked_cache(read, fresh_s=0.01)
        out = [await serials()]  # the first read is waited for
        await asyncio.sleep(0.02)
        out.append(await serials())  # stale: the last set at once, a read started behind (it fails)
        await asyncio.sleep(0.02)
        out.append(await serials())  # the failed read kept {1}; another read started
        await asyncio.sleep(0.1)
        out.append(await serials())
        return out

    assert asyncio.run(run()) == [{1}, {1}, {1}, {1, 2}]


def test_kasou_cluster_says_when_etcds_list_lags_the_revocations() -> None:
    from typer.testing import CliRunner

    from kasou.cli import common, main

    view: dict[str, Any] = {"clustered": True, "leader": "h1", "hosts": ["h1", "h3"], "etcd_members": None,
                            "revocation": {"revoked": 2, "list_number": 1, "listed": 0, "signed_at": 1.0}}  # fmt: skip

    class Api:
        def get(self, path: str, params: Any = None) -> Any:
            assert path == "/v1/cluster"
            return view

    common.client_factory = lambda: Api()  # type: ignore[assignment,return-value]
    try:
        out = CliRunner().invoke(main.app, ["cluster"]).output
        assert "certificates revoked: 2 (2 not yet in etcd's list: the CA's host signs it when it is up)" in out, out
        view["revocation"]["listed"] = 2
        out = CliRunner().invoke(main.app, ["cluster"]).output
        assert "certificates revoked: 2" in out and "not yet" not in out
        out = CliRunner().invoke(main.app, ["cluster", "-o", "json", "-c", "revocation"]).output
        assert json.loads(out) == {"revocation": view["revocation"]}
    finally:
        common.client_factory = None
