"""TLS on real sockets (127.0.0.1, uvicorn, ssl): the API serves HTTPS only and refuses plain HTTP
off loopback; an agent on TCP wants a client certificate of the site CA (mutual TLS)."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn

from kasou import pki
from kasou.agent.app import Agent, create_agent_app
from kasou.agent.client import AgentClient
from kasou.agent.storage import LocalDisks
from kasou.api.app import create_app
from kasou.api.audit import sign_forwarded
from kasou.api.client import Client
from kasou.api.deps import Services
from kasou.api.server import run_api
from kasou.config import Paths, TlsFiles
from kasou.control.hosts import Agents
from kasou.errors import AgentUnavailable, Forbidden
from kasou.serving import tls_config
from kasou.store.sqlite import SqliteStore
from tests.doubles.driver import FakeDriver
from tests.functional.conftest import TOKEN, make_fake_image
from tests.unit.test_pki import foreign_certificate


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def site(tmp_path: Path) -> dict[str, TlsFiles]:
    """A site CA with two hosts, and a host of another CA."""
    pki.init_ca(tmp_path / "ca")
    out = {}
    for host in ("h1", "h2"):
        pki.issue(tmp_path / "ca", host, ["127.0.0.1"], [], tmp_path / host)
        out[host] = TlsFiles(tmp_path / host / "ca.crt", tmp_path / host / "host.crt", tmp_path / host / "host.key")
    pki.init_ca(tmp_path / "other")
    pki.issue(tmp_path / "other", "intruder", ["127.0.0.1"], [], tmp_path / "intruder")
    out["intruder"] = TlsFiles(
        tmp_path / "intruder" / "ca.crt", tmp_path / "intruder" / "host.crt", tmp_path / "intruder" / "host.key"
    )
    return out


def serve(app: Any, port: int, tls: dict[str, Any]) -> Iterator[None]:
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", **tls))
    t = threading.Thread(target=server.run, daemon=True)
    t.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline and t.is_alive(), "the server did not start"
        time.sleep(0.02)
    try:
        yield
    finally:
        server.should_exit = True
        t.join(10)


def fake_agent(tmp_path: Path, host: str, known: list[str] | None = None) -> Agent:
    images = tmp_path / "images"
    if not images.exists():
        make_fake_image(images)

    async def registry() -> list[str]:
        return known or []

    return Agent(
        host=host, driver=FakeDriver(), disks=LocalDisks(tmp_path / "disks", images), accelerator="tcg",
        accelerator_reason="test", qemu_version="7.2", images=lambda: ["tiny"], known_hosts=registry,
    )  # fmt: skip


@pytest.fixture
def agent_url(tmp_path: Path, site: dict[str, TlsFiles]) -> Iterator[str]:
    """h1's agent on 127.0.0.1 over mutual TLS, as `kasou agent --listen` serves it."""
    port = free_port()
    yield from (
        f"https://127.0.0.1:{port}"
        for _ in serve(create_agent_app(fake_agent(tmp_path, "h1")), port, tls_config(site["h1"], "required"))
    )


async def ping(url: str, verify: Any) -> bool:
    c = AgentClient("h1", base_url=url, verify=verify)
    try:
        return await c.ping(timeout=5)
    finally:
        await c.close()


def test_agent_answers_a_control_plane_with_the_sites_certificate(agent_url: str, site: dict[str, TlsFiles]) -> None:
    async def go() -> None:
        c = AgentClient("h1", base_url=agent_url, verify=pki.host_client_context(site["h2"]))
        try:
            assert await c.ping()
            assert (await c.host_info()).name == "h1"
            assert await c.images() == ["tiny"]
        finally:
            await c.close()

    asyncio.run(go())


def test_agent_refuses_a_client_without_a_certificate(agent_url: str, site: dict[str, TlsFiles]) -> None:
    assert not asyncio.run(ping(agent_url, pki.client_context(site["h2"].ca)))
    with httpx.Client(verify=pki.client_context(site["h2"].ca), timeout=5) as c, pytest.raises(httpx.TransportError):
        c.get(agent_url + "/agent/v1/ping")


def test_agent_refuses_a_certificate_of_another_ca(agent_url: str, site: dict[str, TlsFiles]) -> None:
    intruder = pki.client_context(site["h2"].ca, site["intruder"].cert, site["intruder"].key)
    assert not asyncio.run(ping(agent_url, intruder))


def test_agent_refuses_a_certificate_of_the_site_ca_that_is_not_a_kasou_host(
    tmp_path: Path, agent_url: str, site: dict[str, TlsFiles]
) -> None:
    """A printer's certificate from the same CA: 403 on every route, the websocket too, and nothing done."""
    import websockets.sync.client as ws

    printer = foreign_certificate(tmp_path / "ca", "printer", ["127.0.0.1"], ["printer"], tmp_path / "printer")
    victim = tmp_path / "disks" / "emr" / "disk0.qcow2"
    victim.parent.mkdir(parents=True)
    victim.write_bytes(b"the lab's disk")
    pool = tmp_path / "pools" / "stolen"
    ctx = pki.client_context(site["h2"].ca, printer.cert, printer.key)
    with httpx.Client(verify=ctx, timeout=5) as c:
        for method, path, body in (
            ("GET", "/agent/v1/host", None),
            ("GET", "/agent/v1/vms", None),
            ("POST", "/agent/v1/pools/usage", [{"name": "stolen", "path": str(pool)}]),
            ("POST", "/agent/v1/disks/delete", {"path": str(victim)}),
        ):
            r = c.request(method, agent_url + path, json=body)
            assert r.status_code == 403, (path, r.text)
            msg = r.json()["message"]
            assert "CN=printer" in msg and "kasou host" in msg and "\n" not in msg, msg
    vnc = agent_url.replace("https://", "wss://") + "/agent/v1/vms/emr/vnc"
    with pytest.raises(Exception, match="403"), ws.connect(vnc, ssl=ctx, open_timeout=5):
        pass
    with ws.connect(vnc, ssl=pki.host_client_context(site["h2"]), open_timeout=5):
        pass  # a host's certificate opens it (the VM has no display: it is closed after that)
    assert victim.read_bytes() == b"the lab's disk" and not pool.exists()
    assert not (tmp_path / "pools.json").exists()
    # the site's host certificate still gets in
    assert asyncio.run(ping(agent_url, pki.host_client_context(site["h2"])))


def test_agent_takes_the_hospitals_certificate_of_a_registered_host(tmp_path: Path, site: dict[str, TlsFiles]) -> None:
    """The hospital's own PKI has no kasou marker: a certificate naming a host of the registry is taken."""
    h3 = foreign_certificate(tmp_path / "ca", "h3.hospital.example", ["127.0.0.1"], ["h3.hospital.example"],
                             tmp_path / "h3")  # fmt: skip
    printer = foreign_certificate(tmp_path / "ca", "printer", ["127.0.0.1"], ["printer"], tmp_path / "printer")
    port = free_port()
    agent = fake_agent(tmp_path, "h1", known=["h2", "h3.hospital.example", "10.88.0.12"])
    for _ in serve(create_agent_app(agent), port, tls_config(site["h1"], "required")):
        url = f"https://127.0.0.1:{port}"
        assert asyncio.run(ping(url, pki.client_context(site["h2"].ca, h3.cert, h3.key)))
        with pytest.raises(Forbidden, match="CN=printer"):
            asyncio.run(ping(url, pki.client_context(site["h2"].ca, printer.cert, printer.key)))


def test_agent_refuses_plain_http_and_is_verified_by_the_caller(agent_url: str, site: dict[str, TlsFiles]) -> None:
    assert not asyncio.run(ping(agent_url.replace("https://", "http://"), True))
    # a control plane of another site does not trust this agent either
    other = pki.client_context(site["intruder"].ca, site["intruder"].cert, site["intruder"].key)
    assert not asyncio.run(ping(agent_url, other))


def test_control_plane_reaches_agents_through_their_https_records(agent_url: str, site: dict[str, TlsFiles]) -> None:
    class Records:
        async def range(self, prefix: str) -> list[Any]:
            from types import SimpleNamespace

            return [SimpleNamespace(key="hosts/h1", value={"name": "h1", "agent_url": agent_url})]

    async def go() -> None:
        agents = Agents(store=Records(), tls=pki.host_client_context(site["h2"]))  # type: ignore[arg-type]
        await agents.refresh(force=True)
        try:
            assert await agents.get("h1").ping()
        finally:
            await agents.close()

    asyncio.run(go())


@pytest.fixture
def api_url(tmp_path: Path, site: dict[str, TlsFiles]) -> Iterator[str]:
    """The API (fake driver behind it) over HTTPS on 127.0.0.1, client certificates optional."""
    agent = AgentClient("h1", transport=httpx.ASGITransport(app=create_agent_app(fake_agent(tmp_path, "h1"))))

    async def factory() -> Services:
        return Services.build(SqliteStore(tmp_path / "state.db"), Agents({"h1": agent}), shutdown_timeout=2)

    port = free_port()
    yield from (
        f"https://127.0.0.1:{port}" for _ in serve(create_app(factory, TOKEN), port, tls_config(site["h1"], "optional"))
    )


def test_api_serves_https_verified_with_the_site_ca(api_url: str, site: dict[str, TlsFiles]) -> None:
    c = Client(api_url, TOKEN, verify=pki.trust(site["h2"]))
    try:
        assert c.get("/v1/vms") == []
    finally:
        c.close()
    # a forwarding follower presents its certificate; one of another CA is refused in the handshake
    with httpx.Client(verify=pki.host_client_context(site["h2"]), timeout=5) as h:
        assert h.get(api_url + "/v1/version", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200
    intruder = pki.client_context(site["h2"].ca, site["intruder"].cert, site["intruder"].key)
    with httpx.Client(verify=intruder, timeout=5) as h, pytest.raises(httpx.TransportError):
        h.get(api_url + "/v1/version")


def test_leader_refuses_a_forwarded_call_from_a_certificate_that_is_not_a_kasou_host(
    tmp_path: Path, api_url: str, site: dict[str, TlsFiles]
) -> None:
    printer = foreign_certificate(tmp_path / "ca", "printer", ["127.0.0.1"], ["printer"], tmp_path / "printer")
    auth = {"Authorization": f"Bearer {TOKEN}"}
    body = {"name": "lab", "vlan": 120}

    def forwarded(method: str, path: str) -> dict[str, str]:
        return {**auth, **sign_forwarded(TOKEN, "10.9.8.7", method, path)}

    ctx = pki.client_context(site["h2"].ca, printer.cert, printer.key)
    with httpx.Client(verify=ctx, timeout=5) as h:
        for method in ("GET", "POST"):
            sent = body if method == "POST" else None
            r = h.request(method, api_url + "/v1/networks", headers=forwarded(method, "/v1/networks"), json=sent)
            assert r.status_code == 403, r.text
            assert "CN=printer" in r.json()["message"] and "forwarded" in r.json()["message"], r.text
        assert h.get(api_url + "/v1/version", headers=auth).status_code == 200  # not forwarded: the token decides
    with httpx.Client(verify=pki.client_context(site["h2"].ca), timeout=5) as h:  # no certificate at all
        assert h.post(api_url + "/v1/networks", headers=forwarded("POST", "/v1/networks"), json=body).status_code == 403
    with httpx.Client(verify=pki.host_client_context(site["h2"]), timeout=5) as h:  # a follower: its host certificate
        assert h.get(api_url + "/v1/networks", headers=forwarded("GET", "/v1/networks")).json() == []  # none made


def test_api_client_refuses_a_server_the_site_ca_does_not_vouch_for(api_url: str, site: dict[str, TlsFiles]) -> None:
    c = Client(api_url, TOKEN, verify=pki.client_context(site["intruder"].ca))
    with pytest.raises(AgentUnavailable, match="TLS check"):
        c.get("/v1/vms")
    c.close()
    with httpx.Client(timeout=5) as h, pytest.raises(httpx.TransportError):
        h.get(api_url.replace("https://", "http://") + "/v1/version")  # no plain HTTP on the HTTPS port


def test_plain_http_is_refused_off_loopback(tmp_path: Path, site: dict[str, TlsFiles]) -> None:
    paths = Paths(home=tmp_path / "home", images=tmp_path / "images")
    for address in ("0.0.0.0:8470", "10.88.0.11:8470", "[::]:8470", "kasou.example:8470"):
        with pytest.raises(pki.TlsError, match=r"only on 127\.0\.0\.1"):
            run_api(paths, address, plain_http=True)
    assert not paths.home.exists(), "refused before anything was made"
    with pytest.raises(pki.TlsError, match="needs this host's certificate"):
        run_api(paths, "127.0.0.1:8470")  # HTTPS, but no certificate: refused, never plain HTTP instead


def test_serve_command_says_why_in_one_line(tmp_path: Path) -> None:
    env = {"KASOU_HOME": str(tmp_path / "home"), "PATH": "/usr/bin:/bin"}
    r = subprocess.run(
        [sys.executable, "-m", "kasou", "serve", "--address", "0.0.0.0:1", "--plain-http"],
        env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert r.returncode == 1
    assert r.stderr.startswith("error: plain HTTP is served only on 127.0.0.1") and r.stderr.count("\n") == 1
    r = subprocess.run(
        [sys.executable, "-m", "kasou", "agent", "--listen", "127.0.0.1:1"],
        env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert r.returncode == 1 and r.stderr.startswith("error: the agent on TCP needs this host's certificate")
