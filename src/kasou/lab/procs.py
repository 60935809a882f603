"""The lab's processes and its hosts' services, seen from outside: is a pid still the service it was,
which QEMU or etcd processes belong to the lab, how to end them by pid (bounded), and HTTP asked from
inside a host's namespace over TLS as that host."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import time
from pathlib import Path
from typing import Any

from kasou import pki
from kasou.errors import KasouError
from kasou.hypervisor.qemu import process
from kasou.lab import net
from kasou.lab.net import LabError
from kasou.lab.state import AGENT_PORT, API_PORT, GONE_TIMEOUT, LabHost


def preflight() -> None:
    """What every lab command that starts something needs: root, ``ip`` and ``etcd``."""
    if os.geteuid() != 0:
        raise LabError("kasou lab needs root (network namespaces, a bridge, veth links)")
    for tool, package in (("ip", "iproute2"), ("etcd", "etcd-server")):
        if shutil.which(tool) is None:
            raise LabError(f"{tool} is not installed (apt-get install {package})")


def is_service(h: LabHost, service: str, pid: int | None) -> bool:
    """True if ``pid`` is this host's ``service`` (guards against a reused pid)."""
    if pid is None or not process.alive(pid):
        return False
    args = process.cmdline(pid)
    want = h.argv(service)
    return "kasou" in args and all(a in args for a in want)


def is_etcd(data_dir: Path, pid: int | None) -> bool:
    if pid is None or not process.alive(pid):
        return False
    args = process.cmdline(pid)
    return bool(args) and os.path.basename(args[0]) == "etcd" and str(data_dir) in args


def marked_processes(marks: list[str], binaries: tuple[str, ...] = ("qemu", "etcd")) -> list[int]:
    """QEMU (or etcd) processes whose command line names one of ``marks`` (a lab path)."""
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        args = process.cmdline(int(d.name))
        if not args or not os.path.basename(args[0]).startswith(binaries):
            continue
        if any(m in a for a in args[1:] for m in marks):
            out.append(int(d.name))
    return out


def kill_all(pids: set[int], timeout: float = GONE_TIMEOUT) -> list[int]:
    """SIGKILL every pid, wait (bounded) until they are gone; the pids that still live."""
    pids.discard(os.getpid())
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + timeout
    left = [p for p in pids if process.alive(p)]
    while left and time.monotonic() < deadline:
        time.sleep(0.05)
        left = [p for p in left if process.alive(p)]
    return left


def terminate(pid: int, grace: float = 5.0) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while process.alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    if process.alive(pid):
        kill_all({pid})


def log_tail(path: Path) -> str:
    """The last telling line of a log (a traceback's last line is its exception)."""
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return "no log"
    lines = [ln.strip() for ln in text if ln.strip().strip("^~ ")]
    return lines[-1] if lines else "empty log"


def probe(h: LabHost, service: str, token: str | None, timeout: float = 2.0) -> int | None:
    """HTTP status of the service's health URL, asked from inside the host's namespace (so it
    answers whether or not the host is partitioned) over TLS as the host itself (its certificate,
    which the agent requires); None if nothing answers."""
    path = "/agent/v1/ping" if service == "agent" else "/v1/version"
    answer = http_get(h, service, path, token, timeout, head_only=True)
    return None if answer is None else answer[0]


def api_get(h: LabHost, path: str, token: str, timeout: float = 5.0) -> Any:
    """The JSON a host's API answers to ``GET path`` (asked as :func:`probe` asks); a KasouError if none."""
    answer = http_get(h, "api", path, token, timeout)
    if answer is None:
        raise LabError(f"the API of {h.name} does not answer")
    status, body = answer
    if status != 200:
        raise LabError(f"the API of {h.name} answers {status} to GET {path}")
    try:
        return json.loads(body)
    except ValueError:
        raise LabError(f"the API of {h.name} answers GET {path} with something that is not JSON") from None


def http_get(
    h: LabHost, service: str, path: str, token: str | None, timeout: float, head_only: bool = False
) -> tuple[int, bytes] | None:
    """(status, body) of ``GET path`` on the host's agent or API from inside its namespace; None if no answer."""
    port = AGENT_PORT if service == "agent" else API_PORT
    auth = f"Authorization: Bearer {token}\r\n" if token and service == "api" else ""
    request = f"GET {path} HTTP/1.1\r\nHost: {h.address}:{port}\r\n{auth}Connection: close\r\n\r\n"
    if not net.netns_exists(h.netns):
        return None
    try:
        sock = net.socket_in(h.netns, timeout)
    except (OSError, TimeoutError, RuntimeError):
        return None
    data = b""
    with sock:
        try:
            ctx = pki.client_context(h.tls_dir / "ca.crt", h.tls_dir / "host.crt", h.tls_dir / "host.key")
            sock.connect((h.address, port))
            with ctx.wrap_socket(sock, server_hostname=h.address) as tls:
                tls.sendall(request.encode())
                while len(data) < (4096 if head_only else 16 * 1024 * 1024):
                    if head_only and b"\r\n" in data:
                        break
                    chunk = tls.recv(65536)
                    if not chunk:
                        break
                    data += chunk
        except (OSError, KasouError):
            return None
    status = data.split(b"\r\n", 1)[0].split()
    if not (len(status) >= 2 and status[0].startswith(b"HTTP/") and status[1].isdigit()):
        return None
    head, _, body = data.partition(b"\r\n\r\n")
    if b"transfer-encoding: chunked" in head.lower():
        body = dechunk(body)
    return int(status[1]), body


def dechunk(body: bytes) -> bytes:
    out = b""
    while body:
        size_line, _, rest = body.partition(b"\r\n")
        size = int(size_line.split(b";")[0] or b"0", 16)
        if size == 0:
            break
        out, body = out + rest[:size], rest[size + 2 :]
    return out
