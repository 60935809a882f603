"""Every LDAP call is bounded: a directory that accepts connections and then says nothing (a hung DC, a
firewall that swallows the TLS handshake) costs at most the timeout, and the API's wait on it is bounded too."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from kasou.control.directory import Directory
from kasou.control.ldapclient import LdapDirectory, Settings
from kasou.control.sealed import Sealer
from kasou.errors import DirectoryUnavailable
from kasou.model.directory import DirectorySet
from kasou.store.sqlite import SqliteStore


@pytest.fixture
def silent() -> Iterator[int]:
    """A TCP port that accepts connections and never answers."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(16)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        srv.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(srv.accept()[0])
            except TimeoutError:
                continue
            except OSError:
                return

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    yield srv.getsockname()[1]
    stop.set()
    t.join(5)
    for s in held:
        s.close()
    srv.close()


def _settings(port: int, **kw: object) -> Settings:
    base: dict[str, object] = {"urls": (f"ldaps://127.0.0.1:{port}",), "base_dn": "DC=x", "bind_user": "CN=svc,DC=x",
                               "bind_password": "pw", "timeout_s": 1.0}  # fmt: skip
    base.update(kw)
    return Settings(**base)  # type: ignore[arg-type]


def test_a_silent_directory_costs_the_timeout(silent: int) -> None:
    for kw in ({}, {"urls": (f"ldap://127.0.0.1:{silent}",), "starttls": True}):
        t0 = time.monotonic()
        with pytest.raises(DirectoryUnavailable, match="cannot be reached"):
            LdapDirectory(_settings(silent, **kw)).find_user("alice")
        assert time.monotonic() - t0 < 4, kw


def test_the_api_does_not_wait_on_a_silent_directory(silent: int, tmp_path: Path) -> None:
    async def main() -> float:
        store = SqliteStore(tmp_path / "state.db")
        d = Directory(store, Sealer(tmp_path / "secrets.key"))
        spec = DirectorySet.parse({"urls": [f"ldaps://127.0.0.1:{silent}"], "base_dn": "DC=x", "bind_user": "svc",
                                   "bind_password": "pw", "timeout_s": 1})  # fmt: skip
        t0 = time.monotonic()
        beat = 0

        async def heartbeat() -> None:
            nonlocal beat
            while True:
                await asyncio.sleep(0.05)
                beat += 1

        task = asyncio.create_task(heartbeat())
        with pytest.raises(DirectoryUnavailable):
            await d.set(spec)  # refused: nothing is written
        task.cancel()
        elapsed = time.monotonic() - t0
        assert beat > elapsed / 0.05 / 2, "the event loop was held while the directory was asked"
        assert await d.config() is None
        await store.close()
        return elapsed

    assert asyncio.run(main()) < 5
