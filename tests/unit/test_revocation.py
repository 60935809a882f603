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


def test_a_join_waits_while_etcd_calls_the_cluster_unhealthy(monkeypatch: pytest.MonkeyPatch) -> None:
    from kasou.control import membership

    class Members:
        def __init__(self, refusals: list[str]) -> None:
            self.refusals = refusals
            self.adds = 0

        async def member_list(self) -> list[dict[str, Any]]:
            return [{"id": 1, "name": "h1", "peer_urls": ["https://10.0.0.1:2380"], "client_urls": []}]

        async def member_add(self, peer_urls: list[str]) -> tuple[int, list[dict[str, Any]]]:
            self.adds += 1
            if self.refusals:
                raise StoreError(self.refusals.pop(0))
            return 2, [*await self.member_list(), {"id": 2, "name": "", "peer_urls": peer_urls, "client_urls": []}]

        async def member_remove(self, member_id: int) -> list[dict[str, Any]]:
            raise AssertionError("not here")

    monkeypatch.setattr(membership, "ADD_RETRY_S", 0.0)
    unhealthy = "etcd at https://10.0.0.1:2379 did not complete cluster/member/add: etcdserver: unhealthy cluster"
    m = Members([unhealthy, unhealthy])
    after = asyncio.run(membership.add_member(m, "h3", "10.0.0.3"))
    assert [x.name for x in after] == ["h1", "h3"] and m.adds == 3
    other = Members(["etcd at https://10.0.0.1:2379 did not complete cluster/member/add: no answer within 5s"])
    with pytest.raises(StoreError, match="no answer"):
        asyncio.run(membership.add_member(other, "h3", "10.0.0.3"))
    assert other.adds == 1  # an add that may have happened is never made twice
    monkeypatch.setattr(membership, "ADD_WAIT_S", 0.0)
    with pytest.raises(membership.Conflict, match="join again in a minute"):
        asyncio.run(membership.add_member(Members([unhealthy] * 3), "h3", "10.0.0.3"))


def test_revocations_of_expired_certificates_are_forgotten(tmp_path: Path) -> None:
    from kasou.control.revocation import prune_expired, revoked_serials
    from kasou.store.sqlite import SqliteStore

    async def run() -> tuple[int, set[int]]:
        store = SqliteStore(tmp_path / "state.db")
        try:
            await store.put("cluster/revoked/a1", {"host": "h2", "not_after": 100.0})
            await store.put("cluster/revoked/b2", {"host": "h3", "not_after": 300.0})
            return await prune_expired(store, now=200.0), await revoked_serials(store)
        finally:
            await store.close()

    assert asyncio.run(run()) == (1, {0xB2})
