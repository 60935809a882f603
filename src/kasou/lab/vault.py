"""The lab's backup server (``kasou lab up --backup-server``): a namespace beside the hosts running the production
``kasou backup-server serve``, and the lab's kasou told to copy every backup generation to it.

Layout (``LAB`` is the lab's directory, see :mod:`kasou.lab.hosts`)::

    netns klab-backup          eth0 10.88.0.5/24 (a port of klab0, as a host's), default route via 10.88.0.1
      kasou backup-server serve --dir LAB/backup-server/data --listen 10.88.0.5:8472
    LAB/backup-server/data/    the backup server's data directory (its own self-signed certificate)
    LAB/backup-server/serve.log
    LAB/backup-server/site-backup.key, .pub    the lab's site backup key (0600): what a real site keeps on
                               paper, kept here so ``kasou backup drill --key`` and restores work in the lab
    LAB/backup-server/writer.token             the writer token the server issued to the lab's kasou (0600)

The data directory is made with the backup server's own library (as ``kasou backup-server init``, ``client add
lab --role writer`` and ``key allow`` make it), the server runs as its own process, tracked by pid in
``lab.json``, and kasou is configured through its API (``PUT /v1/backup-server``, what ``kasou backup server
set`` sends). A generation's files are made immutable (``chattr +i``) on file systems that keep the flag:
:func:`teardown` clears it before the lab's directory is removed.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import shutil
import ssl
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from kasou.hypervisor.qemu import process
from kasou.lab import net
from kasou.lab.net import LabError
from kasou.lab.procs import kill_all, log_tail
from kasou.lab.state import GATEWAY, PREFIXLEN, LabVault
from kasou.vault import immutable, tlscert
from kasou.vault import policy as vpolicy
from kasou.vault.crypt import BackupKey, PublicBackupKey
from kasou.vault.store import Store

SERVER_NAME = "lab-backup"
CLIENT_NAME = "lab"  # the writer the lab's kasou sends with
PROBE_TIMEOUT = 2.0


def plan(lab_dir: Path) -> LabVault:
    return LabVault(dir=str(lab_dir / "backup-server"))


def is_serving(v: LabVault, pid: int | None) -> bool:
    """True if ``pid`` is this lab's backup server (guards against a reused pid)."""
    if pid is None or not process.alive(pid):
        return False
    args = process.cmdline(pid)
    return "kasou" in args and all(a in args for a in v.argv())


def setting(v: LabVault, token: str, public_key: PublicBackupKey) -> dict[str, Any]:
    """The body of ``PUT /v1/backup-server`` that points kasou at this backup server."""
    return {"url": v.url, "token": token, "fingerprint": v.fingerprint, "public_key": json.loads(public_key.to_json())}


def is_set(current: dict[str, Any] | None, v: LabVault, server_id: str) -> bool:
    """Whether kasou's backup server (``GET /v1/backup-server``) is this one already."""
    return current is not None and current.get("url") == v.url and current.get("server_id") == server_id


# -- up ------------------------------------------------------------------------------------------


def ensure(v: LabVault, bridge: str, undo: list[Callable[[], Any]], timeout: float) -> str:
    """Its namespace and link, its data directory (made once), its process (started unless it runs); waits
    until it answers with its own certificate. Every piece made is appended to ``undo``."""
    if net.ensure_netns(v.netns):
        undo.append(functools.partial(net.remove_netns, v.netns))
    if net.ensure_host_link(v.veth, v.netns, bridge, v.address, PREFIXLEN, GATEWAY):
        undo.append(functools.partial(net.delete_link, v.veth))
    made = ""
    if not (v.data_dir / "server.json").exists():
        undo.append(functools.partial(_remove_dir, v))
        v.fingerprint = _init(v)
        made = " (data directory made)"
    v.fingerprint = v.fingerprint or tlscert.cert_fingerprint(v.data_dir / "tls")
    state = "running"
    if not is_serving(v, v.pid):
        v.pid = _spawn(v)
        undo.append(functools.partial(kill_all, {v.pid}))
        state = "started"
    _wait_answering(v, timeout)
    return f"backup server {v.address} (netns {v.netns}): {state} pid {v.pid}, {v.url}{made}"


def _init(v: LabVault) -> str:
    """``kasou backup-server init``, ``client add lab --role writer`` and ``key allow`` of a new site key."""
    Path(v.dir).mkdir(mode=0o700, parents=True, exist_ok=True)
    store = Store.create(v.data_dir, SERVER_NAME)
    fp = tlscert.make_certificate(v.data_dir / "tls", SERVER_NAME)
    vpolicy.save_policy(store, vpolicy.Policy())
    token = store.add_client(CLIENT_NAME, "writer")
    fd = os.open(v.token_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    key = BackupKey.generate()
    for p in (v.key_file, _pub_file(v)):
        p.unlink(missing_ok=True)  # a half-made directory's leftovers (the data directory was not made)
    key.save(v.key_file)
    key.public().save(_pub_file(v))
    store.allow_key(key.fingerprint)
    return fp


def _pub_file(v: LabVault) -> Path:
    return v.key_file.with_name(v.key_file.name + ".pub")


def _spawn(v: LabVault) -> int:
    ip = shutil.which("ip")
    if ip is None:
        raise LabError("the ip command is missing (apt-get install iproute2)")
    drop = ("KASOU_TOKEN", "KASOU_API", "KASOU_CA", "KASOU_HOME")
    env = {k: val for k, val in os.environ.items() if k not in drop}
    with open(v.log, "ab") as log:
        proc = subprocess.Popen(
            [ip, "netns", "exec", v.netns, sys.executable, "-m", "kasou", *v.argv()],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=v.dir,
            start_new_session=True, close_fds=True,
        )  # fmt: skip
    return proc.pid  # ip netns exec execs the command: this is kasou's pid


def _wait_answering(v: LabVault, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not probe(v):
        if not is_serving(v, v.pid):
            raise LabError(f"the backup server exited: {log_tail(v.log)}")
        if time.monotonic() > deadline:
            raise LabError(f"the backup server did not answer within {timeout:.0f} s; see {v.log}")
        time.sleep(0.2)


def probe(v: LabVault, timeout: float = PROBE_TIMEOUT) -> bool:
    """Whether it answers HTTPS with its own certificate, asked from inside its namespace."""
    if not v.fingerprint or not net.netns_exists(v.netns):
        return False
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # the pin below is the identity (as kasou's own client does)
    request = f"GET /v1/info HTTP/1.1\r\nHost: {v.address}:{v.port}\r\nConnection: close\r\n\r\n"
    try:
        with net.socket_in(v.netns, timeout) as sock:
            sock.connect((v.address, v.port))
            with ctx.wrap_socket(sock) as tls:
                der = tls.getpeercert(binary_form=True) or b""
                if hashlib.sha256(der).hexdigest() != v.fingerprint:
                    return False
                tls.sendall(request.encode())
                return tls.recv(64).startswith(b"HTTP/")
    except (OSError, TimeoutError, RuntimeError):
        return False


def configure(v: LabVault, api_url: str, ca_file: Path, token: str) -> str:
    """Point the lab's kasou at its backup server (``kasou backup server set``), unless it is set to it."""
    server_id = str(Store(v.data_dir).info()["server_id"])
    headers = {"Authorization": f"Bearer {token}"}
    try:
        with httpx.Client(base_url=api_url, verify=ssl.create_default_context(cafile=str(ca_file)),
                          headers=headers, timeout=30) as c:  # fmt: skip
            r = c.get("/v1/backup-server")
            r.raise_for_status()
            if is_set(r.json(), v, server_id):
                return f"backups: copied to {v.url} (set already)"
            body = setting(v, v.token_file.read_text().strip(), PublicBackupKey.load(_pub_file(v)))
            r = c.put("/v1/backup-server", json=body)
    except (httpx.HTTPError, OSError) as e:
        raise LabError(f"cannot set kasou's backup server through {api_url}: {e}") from e
    if r.status_code != 200:
        raise LabError(f"kasou refused its backup server ({r.status_code}): {_message(r)}")
    return f"backups: copied to {v.url} (server {server_id}); site backup key {v.key_file}"


def _message(r: httpx.Response) -> str:
    try:
        return str(r.json().get("message") or r.text)
    except ValueError:
        return r.text.strip()[:200]


def _remove_dir(v: LabVault) -> None:
    immutable.release_tree(Path(v.dir))
    shutil.rmtree(v.dir, ignore_errors=True)


# -- down and status -----------------------------------------------------------------------------


def processes(v: LabVault) -> set[int]:
    pids = set(net.pids_in_netns(v.netns))
    if is_serving(v, v.pid) and v.pid is not None:
        pids.add(v.pid)
    pids.discard(os.getpid())
    return pids


def teardown(v: LabVault) -> tuple[list[str], list[str]]:
    """End its process, remove its link and namespace, clear the immutable flags of its files (the lab's
    directory is removed after). Returns (what was removed, what could not be)."""
    removed: list[str] = []
    errors: list[str] = []
    pids = processes(v)
    left = kill_all(pids)
    if left:
        errors.append(f"backup server processes outlived SIGKILL: {left}")
    elif pids:
        removed.append(f"backup server (pid {', '.join(map(str, sorted(pids)))})")
    net.remove_each(((v.veth, functools.partial(net.delete_link, v.veth)),
                     (f"netns {v.netns}", functools.partial(net.remove_netns, v.netns))), removed, errors)  # fmt: skip
    with contextlib.suppress(OSError):
        immutable.release_tree(Path(v.dir))
    return removed, errors


def status(v: LabVault) -> dict[str, Any]:
    up = net.link_up(v.veth)
    alive = is_serving(v, v.pid)
    return {
        "address": v.address,
        "url": v.url,
        "netns": v.netns,
        "netns_exists": net.netns_exists(v.netns),
        "link": "missing" if up is None else ("up" if up else "down"),
        "pid": v.pid,
        "alive": alive,
        "answers": alive and probe(v, timeout=1.0),
        "fingerprint": tlscert.display(v.fingerprint) if v.fingerprint else "",
        "data_dir": str(v.data_dir),
        "key_file": str(v.key_file),
    }
