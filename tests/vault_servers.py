"""Real backup servers for tests: ``kasou backup-server init`` and ``serve`` on loopback (HTTPS with the
server's own certificate), started as processes of their own and ended by pid."""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from kasou.vault import immutable, tlscert
from kasou.vault.sync import Primary

SRC = Path(__file__).resolve().parents[1] / "src"
START_TIMEOUT_S = 30


def kasou(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    return subprocess.run([sys.executable, "-m", "kasou", *args], capture_output=True, text=True, env=env,
                          timeout=timeout, check=False)  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Server:
    root: Path
    url: str
    fingerprint: str
    proc: subprocess.Popen[bytes]

    def client(self, token: str) -> Primary:
        return Primary(self.url, token, self.fingerprint, timeout=20)


def start(root: Path, name: str) -> Server:
    r = kasou("backup-server", "init", "--dir", str(root), "--name", name)
    assert r.returncode == 0, r.stderr
    fp = next(line.split(": ", 1)[1] for line in r.stdout.splitlines() if "fingerprint" in line)
    assert tlscert.normalize_fingerprint(fp) == tlscert.cert_fingerprint(root / "tls")
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "kasou", "backup-server", "serve", "--dir", str(root), "--listen", f"127.0.0.1:{port}"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True,
    )  # fmt: skip
    server = Server(root, f"https://127.0.0.1:{port}", fp, proc)
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                break
        except OSError:
            ended = proc.poll() is not None
            if ended or time.monotonic() > deadline:
                why = proc.stderr.read().decode(errors="replace") if ended and proc.stderr else "no answer in time"
                stop(server)
                raise AssertionError(f"the backup server did not start: {why}") from None
            time.sleep(0.2)
    return server


def stop(server: Server) -> None:
    if server.proc.poll() is None:
        os.kill(server.proc.pid, signal.SIGTERM)
        try:
            server.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.kill(server.proc.pid, signal.SIGKILL)
            server.proc.wait(timeout=10)
    if server.proc.stderr:
        server.proc.stderr.close()


def writer_token(server: Server, name: str | None = None) -> str:
    """A writer token the server issues (``client add NAME --role writer``; a new client each call by default)."""
    name = name or f"hv-{secrets.token_hex(3)}"
    r = kasou("backup-server", "client", "add", name, "--role", "writer", "--dir", str(server.root))
    assert r.returncode == 0, r.stderr
    return r.stdout.split("token ")[1].split()[0]


@contextlib.contextmanager
def running(root: Path, *names: str) -> Iterator[list[Server]]:
    """Backup servers named ``names``, each in ``root/NAME``: started, then ended by pid and their files released."""
    started: list[Server] = []
    try:
        for name in names:
            started.append(start(root / name, name))
        yield started
    finally:
        for s in started:
            stop(s)
        immutable.release_tree(root)
