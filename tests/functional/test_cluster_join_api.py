"""``POST /v1/cluster/join`` and its neighbours with the in-process API: the site CA here, etcd's
membership a stand-in (the real one: tests/integration/test_cluster_join.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from kasou import pki
from tests.functional.conftest import TOKEN, Env


class FakeMembers:
    """etcd's member list, add and remove, as the JSON gateway answers them (via EtcdStore)."""

    def __init__(self) -> None:
        self.members: list[dict[str, Any]] = [
            {
                "id": 1,
                "name": "host1",
                "peer_urls": ["https://10.0.0.11:2380"],
                "client_urls": ["https://10.0.0.11:2379"],
            }
        ]

    async def member_list(self) -> list[dict[str, Any]]:
        return [dict(m) for m in self.members]

    async def member_add(self, peer_urls: list[str]) -> tuple[int, list[dict[str, Any]]]:
        new = {"id": len(self.members) + 1, "name": "", "peer_urls": peer_urls, "client_urls": []}
        self.members.append(new)
        return int(new["id"]), await self.member_list()

    async def member_remove(self, member_id: int) -> list[dict[str, Any]]:
        self.members = [m for m in self.members if m["id"] != member_id]
        return await self.member_list()


def make_site(services: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, host: str, address: str) -> FakeMembers:
    """This host the CA's (its key, its certificate, the API token file) with etcd's membership a stand-in."""
    tls = tmp_path / "tls"
    pki.init_ca(tls, "test site")
    pki.issue(tls, host, [address], [], tls)
    (tmp_path / "api.token").write_text(TOKEN + "\n")
    monkeypatch.setenv("KASOU_TLS_DIR", str(tls))
    monkeypatch.setenv("KASOU_TOKEN_FILE", str(tmp_path / "api.token"))
    members = FakeMembers()
    services.membership = members
    return members


@pytest.fixture
def site(env: Env, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FakeMembers:
    return make_site(env.services, tmp_path, monkeypatch, "host1", "10.0.0.11")


def join_body(token: str, name: str = "host2", address: str = "10.0.0.12") -> dict[str, Any]:
    _, host_csr = pki.make_request(name)
    _, etcd_csr = pki.make_request(f"etcd-{name}")
    return {"token": token, "name": name, "address": address, "host_csr": host_csr.decode(),
            "etcd_csr": etcd_csr.decode()}  # fmt: skip


def test_join_signs_the_hosts_requests_and_adds_its_member(env: Env, site: FakeMembers) -> None:
    ca = env.api.get("/v1/cluster/ca").json()["ca"]
    token = env.api.post("/v1/cluster/tokens", json={"ttl_s": 600}).json()["token"]
    assert token.endswith(pki.fingerprint(ca))
    anonymous = env.client()  # the joining host has no API token, only the join token
    r = anonymous.post("/v1/cluster/join", json=join_body(token))
    assert r.status_code == 200, r.text
    answer = r.json()
    assert answer["ca"] == ca
    cert = x509.load_pem_x509_certificate(answer["host_cert"].encode())
    dns, ips = pki.sans_of(cert)
    assert "host2" in dns and ips == ["10.0.0.12", "127.0.0.1"] and pki.is_kasou_host(cert)
    assert not pki.is_kasou_host(x509.load_pem_x509_certificate(answer["etcd_cert"].encode()))
    assert [(m["name"], m["peer_url"]) for m in answer["members"]] == [
        ("host1", "https://10.0.0.11:2380"), ("host2", "https://10.0.0.12:2380")
    ]  # fmt: skip
    assert answer["site_files"]["api.token"].strip() == TOKEN  # the same API token on every host
    # used up: a second join with it is refused, and etcd is not touched again
    again = anonymous.post("/v1/cluster/join", json=join_body(token, "host3", "10.0.0.13"))
    assert again.status_code == 401 and "used already" in again.json()["message"]
    assert len(site.members) == 2
    view = env.api.get("/v1/cluster").json()
    assert view["etcd_members"] is None  # a single host's view (no leadership): its members are not asked


def test_a_refused_join_changes_nothing_and_keeps_the_token(env: Env, site: FakeMembers) -> None:
    token = env.api.post("/v1/cluster/tokens").json()["token"]
    anonymous = env.client()
    # a member of that address exists already: 409, the token stays usable
    r = anonymous.post("/v1/cluster/join", json=join_body(token, "hostx", "10.0.0.11"))
    assert r.status_code == 409 and "already" in r.json()["message"], r.text
    bad = join_body(token)
    bad["host_csr"] = "not a request"
    r = anonymous.post("/v1/cluster/join", json=bad)
    assert r.status_code == 422 and len(site.members) == 1
    assert anonymous.post("/v1/cluster/join", json=join_body(token)).status_code == 200
    wrong = token[:-64] + "0" * 64
    r = anonymous.post("/v1/cluster/join", json=join_body(wrong, "host3", "10.0.0.13"))
    assert r.status_code == 401 and "another CA" in r.json()["message"]


def test_only_administrators_make_tokens_and_a_host_with_vms_cannot_leave(env: Env, site: FakeMembers) -> None:
    assert env.client().post("/v1/cluster/tokens").status_code == 401
    env.create("emr1", start=True)
    host = env.api.get("/v1/vms/emr1").json()["host"]
    site.members.append({"id": 9, "name": host, "peer_urls": ["https://10.0.0.19:2380"], "client_urls": []})
    site.members[0]["name"] = "other"
    r = env.api.post("/v1/cluster/leave", json={"host": host})
    assert r.status_code == 409 and "emr1" in r.json()["message"]
    env.wait(env.api.post("/v1/vms/emr1/actions/stop").json()["job"])
    r = env.api.post("/v1/cluster/leave", json={"host": host})
    assert r.status_code == 200 and [m["name"] for m in r.json()["members"]] == ["other"]
    r = env.api.post("/v1/cluster/leave", json={"host": "other"})
    assert r.status_code == 409 and "only etcd member" in r.json()["message"]


def test_a_single_host_is_no_cluster_to_join(env: Env, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pki.init_ca(tmp_path / "tls", "test site")
    monkeypatch.setenv("KASOU_TLS_DIR", str(tmp_path / "tls"))
    r = env.api.post("/v1/cluster/tokens")
    assert r.status_code == 409 and "kasou cluster init" in r.json()["message"]


def test_a_host_that_leaves_has_its_certificates_revoked_in_etcds_list(
    env: Env, site: FakeMembers, tmp_path: Path
) -> None:
    from kasou.control import revocation
    from kasou.control.revocation import Revocations

    ca_pem = (tmp_path / "tls" / "ca.crt").read_bytes()
    token = env.api.post("/v1/cluster/tokens").json()["token"]
    answer = env.client().post("/v1/cluster/join", json=join_body(token)).json()
    assert pki.crl_serials(answer["crl"].encode(), ca_pem) == set()  # the new member's etcd reads it from its start
    issued = {pki.serial_of(answer["host_cert"]), pki.serial_of(answer["etcd_cert"])}
    site.members[-1]["name"] = "host2"  # its member started
    r = env.api.post("/v1/cluster/leave", json={"host": "host2"})
    assert r.status_code == 200, r.text
    assert {int(s, 16) for s in r.json()["revoked"]} == issued
    # The CA's host signs the new list into the store; every host writes it where its etcd reads it.
    crl_file = tmp_path / "etcd" / "crl.pem"
    other = Revocations(env.services.store, None, crl_file)  # a host without the CA's key: it only writes
    call = env.api.portal.call  # type: ignore[union-attr]
    signer = Revocations(env.services.store, tmp_path / "tls", None)
    before = call(revocation.state, env.services.store)
    assert before.revoked == 2 and before.listed == 0  # revoked, not yet in the list (signed empty at the join)
    assert call(signer.sign_if_changed) is True and call(signer.sign_if_changed) is False
    after = call(revocation.state, env.services.store)
    assert after.listed == 2 and after.list_number == before.list_number + 1  # type: ignore[operator]
    assert call(other.sign_if_changed) is False and call(other.write_local) is True
    assert pki.crl_serials(crl_file.read_bytes(), ca_pem) == issued
    assert call(other.write_local) is False  # unchanged: not written again
    # A refused leave revokes nothing; leaving again finds nothing left to revoke.
    assert env.api.post("/v1/cluster/leave", json={"host": "host2"}).status_code == 422


def test_the_ca_host_signs_and_every_host_writes_the_list_moments_after_a_revocation(
    env: Env, site: FakeMembers, tmp_path: Path
) -> None:
    import time

    from kasou.control.revocation import Revocations

    ca_pem = (tmp_path / "tls" / "ca.crt").read_bytes()
    token = env.api.post("/v1/cluster/tokens").json()["token"]
    answer = env.client().post("/v1/cluster/join", json=join_body(token)).json()
    site.members[-1]["name"] = "host2"
    crl_file = tmp_path / "etcd" / "crl.pem"
    # Like the CA's host's API server (it signs and writes), with rounds far apart: the watch brings the change.
    running = Revocations(env.services.store, tmp_path / "tls", crl_file)
    call = env.api.portal.call  # type: ignore[union-attr]
    call(running.start, 60.0)
    try:
        deadline = time.monotonic() + 10
        while not crl_file.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert pki.crl_serials(crl_file.read_bytes(), ca_pem) == set()  # the first round: an empty list
        assert env.api.post("/v1/cluster/leave", json={"host": "host2"}).status_code == 200
        issued = {pki.serial_of(answer["host_cert"]), pki.serial_of(answer["etcd_cert"])}
        t0 = time.monotonic()
        while pki.crl_serials(crl_file.read_bytes(), ca_pem) != issued:
            assert time.monotonic() - t0 < 5, "the list was not rewritten within 5 s of the revocation"
            time.sleep(0.05)
    finally:
        call(running.close)
