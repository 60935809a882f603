"""``kasou cluster``'s pieces without a cluster: join tokens (one use, time-limited, bound to the site CA),
certificates signed from a host's own request, and the files a host's setup writes."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from kasou import clusterhost as ch
from kasou import pki
from kasou.config import Paths
from kasou.control.membership import JoinTokens
from kasou.errors import InvalidSpec, Unauthorized
from kasou.model.cluster import JoinToken, Member, check_address, metrics_url
from kasou.store.sqlite import SqliteStore
from tests.packaging.units import fake_tools

CA = "ab" * 32


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def tokens(tmp_path: Path) -> tuple[JoinTokens, Clock]:
    clock = Clock()
    return JoinTokens(SqliteStore(tmp_path / "state.db"), clock), clock


async def test_a_token_works_once(tokens: tuple[JoinTokens, Clock]) -> None:
    t, _ = tokens
    token, expires = await t.create(CA, 3600, "admin")
    assert str(token).startswith("K1.") and str(token).endswith(CA) and expires == 1_000_000.0 + 3600
    assert JoinToken.parse(str(token)) == token
    stored = str(await t.store.get(f"cluster/join-tokens/{token.id}"))
    assert token.secret not in stored  # only its hash is kept
    await t.claim(str(token), CA, "h2")
    with pytest.raises(Unauthorized, match="used already \\(by host h2"):
        await t.claim(str(token), CA, "h3")


async def test_a_token_given_back_after_a_failed_join_works_again(tokens: tuple[JoinTokens, Clock]) -> None:
    t, _ = tokens
    token, _ = await t.create(CA, 3600, "admin")
    await t.give_back(await t.claim(str(token), CA, "h2"))
    await t.claim(str(token), CA, "h2")


async def test_an_expired_token_is_refused(tokens: tuple[JoinTokens, Clock]) -> None:
    t, clock = tokens
    token, _ = await t.create(CA, 60, "admin")
    clock.now += 61
    with pytest.raises(Unauthorized, match="expired"):
        await t.claim(str(token), CA, "h2")


async def test_a_token_of_another_ca_or_a_wrong_secret_is_refused(tokens: tuple[JoinTokens, Clock]) -> None:
    t, _ = tokens
    token, _ = await t.create(CA, 3600, "admin")
    with pytest.raises(Unauthorized, match="another CA"):
        await t.claim(str(token), "cd" * 32, "h2")
    forged = JoinToken(id=token.id, secret="x" * 32, ca_sha256=CA)
    with pytest.raises(Unauthorized, match="not valid"):
        await t.claim(str(forged), CA, "h2")
    await t.claim(str(token), CA, "h2")  # the failed attempts used nothing up


@pytest.mark.parametrize("text", ["", "K1.abc", f"K2.0123abcd.{'a' * 32}.{CA}", f"K1.0123abcd.{'a' * 31}.{CA}"])
def test_a_malformed_token_is_refused(text: str) -> None:
    with pytest.raises(InvalidSpec, match="not a kasou join token"):
        JoinToken.parse(text)


@pytest.mark.parametrize("bad", ["127.0.0.1", "0.0.0.0", "host1", "10.0.0.300"])
def test_a_host_address_must_be_reachable(bad: str) -> None:
    with pytest.raises(InvalidSpec):
        check_address(bad)


def test_a_signed_request_names_what_the_ca_vouches_for(tmp_path: Path) -> None:
    pki.init_ca(tmp_path, "site")
    key_pem, csr_pem = pki.make_request("whatever-the-host-says")
    cert = x509.load_pem_x509_certificate(pki.sign_request(tmp_path, csr_pem, "h2", ["10.0.0.12"], ["localhost"]))
    dns, ips = pki.sans_of(cert)
    assert sorted(dns) == ["h2", "localhost"] and ips == ["10.0.0.12"] and pki.is_kasou_host(cert)
    etcd = x509.load_pem_x509_certificate(pki.sign_request(tmp_path, csr_pem, "etcd-h2", ["10.0.0.12"], [], False))
    assert not pki.is_kasou_host(etcd)
    d = tmp_path / "host"
    pki.write_host_files(d, pki.pem_of(tmp_path / "ca.crt"), cert.public_bytes(serialization.Encoding.PEM), key_pem)
    pki.verify(d / "host.crt", d / "ca.crt")
    assert stat.S_IMODE((d / "host.key").stat().st_mode) == 0o600
    assert pki.fingerprint((d / "ca.crt").read_bytes()) == pki.info(d / "ca.crt").sha256.replace(":", "").lower()
    with pytest.raises(InvalidSpec, match="not PEM"):
        pki.sign_request(tmp_path, "nonsense", "h2", ["10.0.0.12"], [])


def test_settings_and_etcd_files(tmp_path: Path) -> None:
    paths = Paths(home=tmp_path / "home", images=tmp_path / "images")
    members = [
        Member(name="h1", peer_url="https://10.0.0.11:2380", client_url="https://10.0.0.11:2379"),
        Member(name="h2", peer_url="https://10.0.0.12:2380", client_url="https://10.0.0.12:2379"),
    ]
    settings = ch.host_settings("h2", "10.0.0.12", paths, tmp_path / "etc", members)
    path = ch.write_settings(tmp_path / "etc", settings)
    assert path == tmp_path / "etc" / "cluster.env" and stat.S_IMODE(path.stat().st_mode) == 0o644
    back = ch.read_settings(tmp_path / "etc")
    assert back == settings
    assert back["KASOU_ETCD"] == "https://10.0.0.11:2379,https://10.0.0.12:2379"
    assert back["KASOU_ETCD_METRICS"] == "https://10.0.0.11:2381,https://10.0.0.12:2381"
    assert back["KASOU_API"] == "https://10.0.0.12:8470" and back["KASOU_AGENT_OPTS"] == "--listen 10.0.0.12:8471"
    assert back["KASOU_SERVE_OPTS"] == ""  # HTTPS
    etcd = ch.etcd_settings("h2", "10.0.0.12", paths, members, "existing", "kasou-x")
    ch.write_etcd_settings(tmp_path / "etc", etcd)
    e = ch.read_env(tmp_path / "etc" / "etcd.env")
    assert e["ETCD_INITIAL_CLUSTER"] == "h1=https://10.0.0.11:2380,h2=https://10.0.0.12:2380"
    assert e["ETCD_INITIAL_CLUSTER_STATE"] == "existing" and e["ETCD_CLIENT_CERT_AUTH"] == "true"
    assert e["ETCD_LISTEN_METRICS_URLS"] == metrics_url(e["ETCD_ADVERTISE_CLIENT_URLS"])
    assert e["ETCD_DATA_DIR"] == str(paths.home / "etcd")
    with pytest.raises(ch.ClusterSetupError):
        ch.write_settings(tmp_path / "etc", {"KASOU_X": "a\nb"})
    ch.write_site_file(tmp_path / "etc" / "api.token", "t\n")
    assert stat.S_IMODE((tmp_path / "etc" / "api.token").stat().st_mode) == 0o600


def test_under_systemd_the_units_are_enabled_and_started(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The systemd path, with stand-ins for systemctl: what init and join ask of it."""
    fake_tools(tmp_path / "bin")
    log = tmp_path / "log"
    log.write_text("")
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_LOG", str(log))
    monkeypatch.setattr(ch, "wait_etcd", lambda *a, **k: None)
    paths = Paths(home=tmp_path / "home", images=tmp_path / "images")
    member = [Member(name="h1", peer_url="https://10.0.0.11:2380", client_url="https://10.0.0.11:2379")]
    ch.write_etcd_settings(tmp_path, ch.etcd_settings("h1", "10.0.0.11", paths, member, "new", "kasou-x"))
    assert "kasou-etcd.service" in ch.start_etcd(paths, tmp_path, systemd=True)
    ch.start_services(paths, systemd=True)
    ch.stop_services(paths, systemd=True)
    ch.stop_etcd(paths, systemd=True)
    assert log.read_text().splitlines() == [
        "systemctl daemon-reload",
        "systemctl enable --now kasou-etcd.service",
        "systemctl enable kasou-agent.service kasou-api.service",
        "systemctl restart kasou-agent.service kasou-api.service",
        "systemctl stop kasou-api.service kasou-agent.service",
        "systemctl disable --now kasou-etcd.service",
    ]
