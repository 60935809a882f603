"""``kasou cluster init`` on one host, ``join`` on a second and a third, ``remove`` of the third once it is dead,
``leave`` of the second: the real commands, each host a network
namespace of its own with its own home and settings directory, joined by a bridge; etcd with TLS, the
production agent and API, started without systemd (as on a machine where PID 1 is not systemd). No VM is
booted. The teardown SIGKILLs every process left in the namespaces (by pid) and removes the namespaces,
links and directories.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from kasou.config import Paths
from kasou.lab import net
from kasou.lab.procs import kill_all
from kasou.pki import host_client_context
from kasou.store.etcd import EtcdStore

pytestmark = [pytest.mark.etcd, pytest.mark.timeout(600)]

BRIDGE = "kjoin0"
GATEWAY = "10.89.0.1"
HOSTS = {"h1": "10.89.0.11", "h2": "10.89.0.12", "h3": "10.89.0.13"}
STEP_TIMEOUT = 240


@dataclass
class Host:
    name: str
    address: str
    dir: Path

    @property
    def netns(self) -> str:
        return f"kjoin-{self.name}"

    @property
    def etc(self) -> Path:
        return self.dir / "etc"

    @property
    def home(self) -> Path:
        return self.dir / "home"

    def env(self, settings: bool = True) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("KASOU_", "ETCD_"))}
        env.update(
            PYTHONPATH=os.pathsep.join(sys.path),
            KASOU_HOME=str(self.home),
            KASOU_IMAGES=str(self.dir / "images"),
            KASOU_CONFIG_DIR=str(self.etc),
            KASOU_HOST_NAME=self.name,
            KASOU_ACCEL="tcg",  # no KVM probe: no VM boots here
            KASOU_SYSTEMD="0",
        )
        if settings:  # what "set -a; . /etc/kasou/cluster.env" gives a root shell
            for line in (
                (self.etc / "cluster.env").read_text().splitlines() if (self.etc / "cluster.env").exists() else []
            ):
                if line and not line.startswith("#"):
                    k, _, v = line.partition("=")
                    env[k] = v
        return env

    def kasou(self, *args: str, check: bool = True, timeout: float = STEP_TIMEOUT) -> subprocess.CompletedProcess[str]:
        r = subprocess.run(
            ["ip", "netns", "exec", self.netns, sys.executable, "-m", "kasou", *args],
            env=self.env(), capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL,
        )  # fmt: skip
        if check and r.returncode != 0:
            raise AssertionError(f"kasou {' '.join(args)} on {self.name} failed: {r.stdout}\n{r.stderr}")
        return r

    def cluster(self) -> dict[str, Any]:
        return dict(json.loads(self.kasou("cluster", "--json").stdout))


def wait_for(what: str, check: Any, timeout: float = 60) -> Any:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        with contextlib.suppress(AssertionError):
            last = check()
            if last:
                return last
        time.sleep(0.5)
    raise AssertionError(f"{what} not within {timeout:.0f} s (last: {last})")


@pytest.fixture
def hosts(tmp_path: Path) -> Iterator[dict[str, Host]]:
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("needs root and iproute2 (network namespaces)")
    if shutil.which("etcd") is None:
        pytest.skip("needs etcd (apt-get install etcd-server)")
    made = {n: Host(n, a, tmp_path / n) for n, a in HOSTS.items()}
    try:
        net.ensure_bridge(BRIDGE, GATEWAY, 24)
        for h in made.values():
            for d in (h.home, h.etc, h.dir / "images"):
                d.mkdir(parents=True)
            net.ensure_netns(h.netns)
            net.ensure_host_link(h.netns, h.netns, BRIDGE, h.address, 24, GATEWAY)
        yield made
    finally:
        pids: set[int] = set()
        for h in made.values():
            if net.netns_exists(h.netns):
                pids |= set(net.pids_in_netns(h.netns))
        left = kill_all(pids)
        for h in made.values():
            with contextlib.suppress(Exception):
                net.delete_link(h.netns)
            with contextlib.suppress(Exception):
                net.remove_netns(h.netns)
        with contextlib.suppress(Exception):
            net.delete_link(BRIDGE)
        assert not left, f"processes outlived SIGKILL: {left}"


def _client(h: Host, cert_dir: Path) -> httpx.Client:
    ctx = ssl.create_default_context(cafile=str(h.home / "tls" / "ca.crt"))
    ctx.load_cert_chain(cert_dir / "host.crt", cert_dir / "host.key")
    return httpx.Client(verify=ctx, timeout=10)


def _etcd_answers(h: Host, cert_dir: Path) -> bool:
    """Does h's etcd member answer a new connection that presents the certificate in ``cert_dir``?"""
    try:
        with _client(h, cert_dir) as c:
            return c.post(f"https://{h.address}:2379/v3/maintenance/status", json={}).status_code == 200
    except httpx.HTTPError:
        return False  # the TLS handshake was refused


def _agent_status(h: Host, cert_dir: Path) -> int:
    with _client(h, cert_dir) as c:
        return c.get(f"https://{h.address}:8471/agent/v1/host").status_code


def token_of(output: str) -> str:
    return next(ln.split()[-1] for ln in output.splitlines() if ln.startswith("join token"))


def test_init_join_remove_leave(hosts: dict[str, Host]) -> None:
    h1, h2, h3 = hosts["h1"], hosts["h2"], hosts["h3"]
    t0 = time.monotonic()
    init = h1.kasou("cluster", "init", "--name", "test site", "--address", h1.address, "--no-systemd")
    t_init = time.monotonic() - t0
    token = token_of(init.stdout)
    api = f"https://{h1.address}:8470"
    assert f"kasou cluster join {api} --token {token}" in init.stdout
    assert (h1.etc / "cluster.env").exists() and (h1.etc / "etcd.env").exists()
    assert oct((h1.etc / "api.token").stat().st_mode & 0o777) == "0o600"
    view = h1.cluster()
    assert view["clustered"] and view["hosts"] == ["h1"] and [m["name"] for m in view["etcd_members"]] == ["h1"]

    # A token whose CA fingerprint is not the site's: refused before anything is sent, nothing changes on h2.
    wrong = token[:-64] + ("0" * 64)
    r = h2.kasou("cluster", "join", api, "--token", wrong, "--address", h2.address, "--no-systemd", check=False)
    assert r.returncode == 1 and "fingerprint" in r.stderr, r.stderr
    assert not (h2.etc / "cluster.env").exists() and not (h2.home / "tls").exists()

    t1 = time.monotonic()
    join = h2.kasou("cluster", "join", api, "--token", token, "--address", h2.address, "--no-systemd")
    t_join = time.monotonic() - t1
    assert "etcd members (2): h1, h2" in join.stdout and "3 members survive" in join.stdout, join.stdout
    assert (h2.home / "tls" / "host.key").exists() and (h2.etc / "api.token").read_text() == (
        h1.etc / "api.token"
    ).read_text()
    for h in (h1, h2):
        view = wait_for("both hosts up", lambda h=h: (v := h.cluster())["hosts"] == ["h1", "h2"] and v)
        assert sorted(m["name"] for m in view["etcd_members"]) == ["h1", "h2"]

    # h1 was set up when its etcd was the only member: its store learns h2's member (and fails over to it).
    async def endpoints_learnt() -> list[str]:
        tls = host_client_context(Paths.from_env(h1.home).tls_files())
        store = EtcdStore([f"https://{h1.address}:2379"], tls=tls)
        try:
            await store.get("hosts/h1")
            return store.endpoints
        finally:
            await store.close()

    assert asyncio.run(endpoints_learnt()) == [f"https://{h1.address}:2379", f"https://{h2.address}:2379"]

    # The token worked once: a second use is refused (the site CA from h1's own files, over verified TLS).
    ca = h1.home / "tls" / "ca.crt"
    body = {"token": token, "name": "h3", "address": "10.89.0.13", "host_csr": "x", "etcd_csr": "x"}
    again = httpx.post(f"{api}/v1/cluster/join", json=body, verify=str(ca), timeout=30)
    assert again.status_code == 401 and "used already" in again.json()["message"], again.text

    # etcd reads the site's revocation list from the start on both hosts (empty: nothing revoked yet).
    for h in (h1, h2):
        assert "ETCD_CLIENT_CRL_FILE=" in (h.etc / "etcd.env").read_text()
        assert (h.home / "tls" / "etcd" / "crl.pem").exists()
    kept = hosts["h1"].dir.parent / "h2-certificate"  # what a stolen disk of h2 would hold
    kept.mkdir()
    for f in ("host.crt", "host.key"):
        shutil.copy(h2.home / "tls" / f, kept / f)
    assert _etcd_answers(h1, kept) and _agent_status(h1, kept) == 200

    # h3 joins, then dies (every process in its namespace killed): removed from h1, its certificate refused.
    token3 = token_of(h1.kasou("cluster", "token").stdout)
    join3 = h3.kasou("cluster", "join", api, "--token", token3, "--address", h3.address, "--no-systemd")
    assert "etcd members (3): h1, h2, h3" in join3.stdout, join3.stdout
    lost = hosts["h1"].dir.parent / "h3-certificate"
    lost.mkdir()
    for f in ("host.crt", "host.key"):
        shutil.copy(h3.home / "tls" / f, lost / f)
    wait_for("h3 up", lambda: "h3" in h1.cluster()["hosts"])
    refused = h1.kasou("cluster", "remove", "h3", check=False)
    assert refused.returncode == 4 and "run kasou cluster leave on h3" in refused.stderr, refused.stderr
    assert not kill_all(set(net.pids_in_netns(h3.netns)))
    wait_for("h3 down", lambda: h1.cluster()["hosts"] == ["h1", "h2"], timeout=30)
    t3 = time.monotonic()
    removed = h1.kasou("cluster", "remove", "h3")
    t_remove = time.monotonic() - t3
    assert "members left (2): h1, h2" in removed.stdout and "certificates revoked (2)" in removed.stdout, removed.stdout
    assert sorted(m["name"] for m in h1.cluster()["etcd_members"]) == ["h1", "h2"]
    wait_for("h1's etcd to refuse h3's certificate", lambda: not _etcd_answers(h1, lost), timeout=30)
    wait_for("h2's agent to refuse h3's certificate", lambda: _agent_status(h2, lost) == 403, timeout=15)

    t2 = time.monotonic()
    leave = h2.kasou("cluster", "leave", "--no-systemd")
    t_leave = time.monotonic() - t2
    assert "members left (1): h1" in leave.stdout, leave.stdout
    assert not (h2.etc / "cluster.env").exists() and not (h2.etc / "api.token").exists()
    # h2's certificates are revoked: h1's etcd refuses a new connection with them, h1's agent answers 403.
    assert "certificates revoked (2)" in leave.stdout, leave.stdout
    wait_for("h1's etcd to refuse h2's certificate", lambda: not _etcd_answers(h1, kept), timeout=30)
    t_refused = time.monotonic() - t2 - t_leave  # from the moment leave returned
    wait_for("h1's agent to refuse h2's certificate", lambda: _agent_status(h1, kept) == 403, timeout=15)
    assert _etcd_answers(h1, h1.home / "tls") and _agent_status(h1, h1.home / "tls") == 200
    view = wait_for("h2's lease to end", lambda: (v := h1.cluster())["hosts"] == ["h1"] and v, timeout=30)
    assert [m["name"] for m in view["etcd_members"]] == ["h1"]
    assert view["revocation"]["revoked"] == 4 and view["revocation"]["listed"] == 4, view["revocation"]
    print(f"\ninit {t_init:.1f} s, join {t_join:.1f} s, remove {t_remove:.1f} s, leave {t_leave:.1f} s; h2's "
          f"certificate refused by etcd {t_refused:.2f} s after leave returned")  # fmt: skip
