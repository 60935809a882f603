"""Start and stop a real N-member etcd cluster (on 127.0.0.1 by default), for tests and the lab.

etcd has no service manager on the lab machine: this class is how kasou starts it::

    with EtcdCluster(tmp / "etcd", members=3) as cluster:
        store = EtcdStore(cluster.endpoints)
        ...
        cluster.kill(0)  # SIGKILL one member: quorum holds with 2 of 3

Every member is an ``etcd`` process in its own session, logging to
``<data_dir>/<name>.log`` with its data in ``<data_dir>/<name>.etcd``. :meth:`stop`
ends them by pid (SIGTERM, then SIGKILL) and removes ``data_dir``.

``host`` picks the address every member listens on (the lab uses its bridge address,
10.88.0.1, so every lab host's network namespace reaches it); ``base_port`` fixes the
ports (member i: client ``base_port + 2i``, peer ``base_port + 2i + 1``, metrics
``base_port + 2n + i``: the metrics listener answers while the client port waits for the
member to join a working cluster, see :mod:`kasou.agent.guard`). ``start(members=...)``
starts only some members, e.g. to restart the dead ones of a cluster whose other members
another process started: a member restarted on its existing data directory rejoins the
cluster (etcd ignores the ``--initial-cluster*`` flags then).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import ssl
import subprocess
import time
import uuid
from collections.abc import Iterable
from pathlib import Path
from types import TracebackType

import httpx

from kasou import pki
from kasou.config import TlsFiles
from kasou.errors import OperationTimeout, StoreError

HOST = "127.0.0.1"


def _free_ports(count: int, host: str = HOST) -> list[int]:
    """``count`` distinct ports the kernel considers free on ``host`` right now."""
    socks = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind((host, 0))
            socks.append(s)
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


class EtcdCluster:
    """``members`` etcd processes forming one cluster, all listening on ``host``."""

    def __init__(
        self,
        data_dir: Path,
        members: int = 3,
        base_port: int | None = None,
        host: str = HOST,
        tls: TlsFiles | None = None,
    ) -> None:
        """``tls``: a certificate (server and client use, for ``host``) and the CA that signed it:
        every URL is then ``https://``, and clients and peers must present a certificate of that CA."""
        if members < 1:
            raise ValueError("an etcd cluster needs at least one member")
        self.data_dir = Path(data_dir)
        self.members = members
        self.host = host
        # member i: client port ports[2i], peer port ports[2i + 1], metrics port ports[2n + i]
        if base_port is None:
            self._ports = _free_ports(3 * members, host)
        else:
            self._ports = list(range(base_port, base_port + 3 * members))
        self.tls = tls
        self._scheme = "https" if tls is not None else "http"
        self.names = [f"m{i}" for i in range(members)]
        self._procs: list[subprocess.Popen[bytes] | None] = [None] * members
        self._token = f"kasou-lab-{uuid.uuid4().hex[:12]}"

    @property
    def endpoints(self) -> list[str]:
        """The client URLs, one per member (dead members included)."""
        return [f"{self._scheme}://{self.host}:{self._ports[2 * i]}" for i in range(self.members)]

    @property
    def peer_urls(self) -> list[str]:
        return [f"{self._scheme}://{self.host}:{self._ports[2 * i + 1]}" for i in range(self.members)]

    @property
    def metrics_urls(self) -> list[str]:
        """Each member's metrics listener (``--listen-metrics-urls``), in the order of :attr:`endpoints`."""
        return [f"{self._scheme}://{self.host}:{self._ports[2 * self.members + i]}" for i in range(self.members)]

    def client_tls(self) -> ssl.SSLContext | bool:
        """What a client of this cluster verifies with (and presents): for httpx's ``verify``."""
        if self.tls is None:
            return True
        return pki.client_context(self.tls.ca, self.tls.cert, self.tls.key)

    def _tls_flags(self) -> list[str]:
        if self.tls is None:
            return []
        cert, key, ca = str(self.tls.cert), str(self.tls.key), str(self.tls.ca)
        return [
            "--cert-file", cert, "--key-file", key, "--trusted-ca-file", ca, "--client-cert-auth",
            "--peer-cert-file", cert, "--peer-key-file", key, "--peer-trusted-ca-file", ca, "--peer-client-cert-auth",
        ]  # fmt: skip

    @property
    def pids(self) -> list[int | None]:
        """The pid of each member, None for one not started or already reaped."""
        return [None if p is None or p.poll() is not None else p.pid for p in self._procs]

    def log_path(self, index: int) -> Path:
        return self.data_dir / f"{self.names[index]}.log"

    def start(self, timeout: float = 30, members: Iterable[int] | None = None) -> list[str]:
        """Start every member (or only the indices in ``members``); return the client URLs once
        each member of the cluster, started here or not, reports itself healthy.

        Raises StoreError if etcd is not installed or a member exits, OperationTimeout if the
        cluster is not healthy within ``timeout`` seconds; in both cases nothing started by this
        call is left running.
        """
        binary = shutil.which("etcd")
        if binary is None:
            raise StoreError("etcd is not installed (apt-get install etcd-server etcd-client)")
        indices = sorted(set(range(self.members) if members is None else members))
        if any(i not in range(self.members) for i in indices):
            raise ValueError(f"member indices must be in 0..{self.members - 1}")
        if any((p := self._procs[i]) is not None and p.poll() is None for i in indices):
            raise StoreError("this etcd cluster was started already")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        initial = ",".join(f"{n}={u}" for n, u in zip(self.names, self.peer_urls, strict=True))
        # etcd also reads its flags from ETCD_* variables: do not let the caller's leak in.
        env = {k: v for k, v in os.environ.items() if not k.startswith("ETCD_")}
        try:
            for i in indices:
                name = self.names[i]
                args = [
                    binary,
                    "--name", name,
                    "--data-dir", str(self.data_dir / f"{name}.etcd"),
                    "--listen-client-urls", self.endpoints[i],
                    "--advertise-client-urls", self.endpoints[i],
                    "--listen-peer-urls", self.peer_urls[i],
                    "--initial-advertise-peer-urls", self.peer_urls[i],
                    "--listen-metrics-urls", self.metrics_urls[i],
                    "--initial-cluster", initial,
                    "--initial-cluster-state", "new",
                    "--initial-cluster-token", self._token,
                    "--logger", "zap",
                    "--log-outputs", "stderr",
                    *self._tls_flags(),
                ]  # fmt: skip
                with open(self.log_path(i), "ab") as log:
                    self._procs[i] = subprocess.Popen(
                        args,
                        stdin=subprocess.DEVNULL,
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,
                        env=env,
                    )
            self._wait_healthy(timeout)
        except BaseException:
            self._terminate(only=indices)
            raise
        return self.endpoints

    def _wait_healthy(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        pending = set(range(self.members))
        with httpx.Client(timeout=1.0, verify=self.client_tls()) as client:
            while pending:
                for i in sorted(pending):
                    proc = self._procs[i]
                    if proc is not None and proc.poll() is not None:
                        raise StoreError(
                            f"etcd member {self.names[i]} exited with status {proc.returncode}: {self._log_tail(i)}"
                        )
                    try:
                        r = client.get(f"{self.endpoints[i]}/health")
                        if r.status_code == 200 and r.json().get("health") == "true":
                            pending.discard(i)
                    except (httpx.HTTPError, ValueError):
                        pass
                if not pending:
                    return
                if time.monotonic() > deadline:
                    names = ", ".join(self.names[i] for i in sorted(pending))
                    raise OperationTimeout(f"etcd members {names} not healthy after {timeout:g}s")
                time.sleep(0.1)

    def _log_tail(self, index: int, lines: int = 3) -> str:
        try:
            tail = self.log_path(index).read_text(errors="replace").strip().splitlines()[-lines:]
        except OSError:
            return "(no log)"
        return " | ".join(tail) or "(empty log)"

    def kill(self, member_index: int) -> None:
        """SIGKILL one member (to test losing it, or quorum) and reap it."""
        proc = self._procs[member_index]
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait()

    def _terminate(self, grace: float = 5.0, only: Iterable[int] | None = None) -> None:
        # One member at a time: SIGTERM to all at once makes each wait for peers that are
        # leaving too (7 s); one by one, each exits in milliseconds.
        indices = range(self.members) if only is None else only
        for p in (self._procs[i] for i in indices):
            if p is None or p.poll() is not None:
                continue
            with contextlib.suppress(ProcessLookupError):
                os.kill(p.pid, signal.SIGTERM)
            try:
                p.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p.pid, signal.SIGKILL)
                p.wait()

    def stop(self) -> None:
        """Stop every member (SIGTERM, SIGKILL after 5 s; by pid, one by one) and remove ``data_dir``."""
        self._terminate()
        self._procs = [None] * self.members
        shutil.rmtree(self.data_dir, ignore_errors=True)

    def __enter__(self) -> EtcdCluster:
        if all(p is None for p in self._procs):
            self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
