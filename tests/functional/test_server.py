"""The processes `kasou serve` and `kasou agent` as they run (real uvicorn, real sockets): the client
address the API believes, and the agent's unix socket's mode."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def home() -> Iterator[Path]:
    """A short kasou home (a unix socket's path must stay under 108 bytes)."""
    d = Path(tempfile.mkdtemp(prefix="kasou-srv-", dir="/tmp"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


def start(args: list[str], home: Path, **env: str) -> subprocess.Popen[bytes]:
    e = {**os.environ, "KASOU_HOME": str(home), "KASOU_HOST_NAME": "h1", **env}
    e.pop("KASOU_ETCD", None)
    return subprocess.Popen(args, env=e, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)


def stop(p: subprocess.Popen[bytes]) -> None:
    if p.poll() is None:
        os.killpg(p.pid, signal.SIGTERM)
        try:
            p.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait(5)
    assert p.stderr is not None
    p.stderr.close()


@contextlib.contextmanager
def serve_api(home: Path, **env: str) -> Iterator[str]:
    """`kasou serve --plain-http` on 127.0.0.1 (no agent behind it: the requests below need none)."""
    port = free_port()
    p = start([sys.executable, "-m", "kasou", "serve", "--address", f"127.0.0.1:{port}", "--plain-http"], home, **env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert p.poll() is None, p.stderr.read().decode() if p.stderr else ""
            assert time.monotonic() < deadline, "kasou serve did not answer"
            try:
                if httpx.get(url + "/v1/version", timeout=2).status_code < 500:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        yield url
    finally:
        stop(p)


FORGED = {"X-Forwarded-For": "203.0.113.9", "X-Forwarded-Proto": "https", "Forwarded": "for=203.0.113.9"}


def sources(api: str, home: Path) -> list[str]:
    """Two audited requests with a forged client address, without credentials; the sources recorded."""
    token = (home / "api.token").read_text().strip()
    r = httpx.post(api + "/v1/networks", json={"name": "x"}, headers=FORGED, timeout=10)
    assert r.status_code == 401, r.text
    r = httpx.post(api + "/v1/auth/login", json={"name": "nobody", "password": "wrong-password"}, headers=FORGED,
                   timeout=10)  # fmt: skip
    assert r.status_code == 401, r.text
    recs = httpx.get(api + "/v1/audit/records", headers={"Authorization": f"Bearer {token}"}, timeout=10).json()
    assert [x["action"] for x in recs] == ["POST /v1/networks", "login_failed"], recs
    return [x["source"] for x in recs]


def test_x_forwarded_for_from_loopback_is_not_believed(home: Path) -> None:
    """uvicorn believes X-Forwarded-For from 127.0.0.1 unless told not to: anyone on the host could then
    name any source address in the audit log. kasou's own signed X-Kasou-Forwarded-For is the only way
    (tests/functional/test_api_audit.py), or a reverse proxy listed in KASOU_TRUSTED_PROXIES."""
    with serve_api(home / "a") as api:
        assert sources(api, home / "a") == ["127.0.0.1", "127.0.0.1"]
    with serve_api(home / "b", KASOU_TRUSTED_PROXIES="127.0.0.1") as api:
        assert sources(api, home / "b") == ["203.0.113.9", "203.0.113.9"]


def test_trusted_proxies_are_configured_not_assumed(monkeypatch: pytest.MonkeyPatch) -> None:
    from kasou.errors import InvalidSetting
    from kasou.serving import uvicorn_settings

    monkeypatch.delenv("KASOU_TRUSTED_PROXIES", raising=False)
    assert uvicorn_settings() == {"proxy_headers": False}
    monkeypatch.setenv("KASOU_TRUSTED_PROXIES", "10.0.0.5, 10.1.0.0/16")
    assert uvicorn_settings() == {"proxy_headers": True, "forwarded_allow_ips": ["10.0.0.5", "10.1.0.0/16"]}
    monkeypatch.setenv("KASOU_TRUSTED_PROXIES", "10.0.0.5, not-an-address")
    with pytest.raises(InvalidSetting, match=r"KASOU_TRUSTED_PROXIES.*not-an-address"):
        uvicorn_settings()


AGENT = """
from kasou.config import Paths
from kasou.hypervisor.qemu import accel

async def decide(images):  # no probe guest: this test is about the socket
    return accel.AccelDecision("tcg", "test", False, None, "7.2")

accel.decide = decide
from kasou.agent.server import run_agent
run_agent(Paths.from_env())
"""


def test_the_agents_unix_socket_is_roots_only(home: Path) -> None:
    """The agent on its unix socket has no other authentication than the socket's mode: 0600, not the
    0666 uvicorn gives a socket it binds."""
    p = start([sys.executable, "-c", textwrap.dedent(AGENT)], home)
    sock = home / "run" / "agent.sock"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert p.poll() is None, p.stderr.read().decode() if p.stderr else ""
            assert time.monotonic() < deadline, "the agent did not start"
            try:
                with httpx.Client(transport=httpx.HTTPTransport(uds=str(sock)), timeout=2) as c:
                    if c.get("http://agent/agent/v1/ping").status_code == 200:
                        break
            except httpx.TransportError:
                time.sleep(0.2)
        st = os.stat(sock)
        assert stat.S_ISSOCK(st.st_mode) and st.st_uid == os.getuid()
        assert oct(st.st_mode & 0o777) == "0o600"
    finally:
        stop(p)
