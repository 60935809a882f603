"""Wiring for the single-host services: the API server and the host agent, each run by uvicorn."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import os
import socket
import ssl
import subprocess
import sys
from typing import Any

import uvicorn

from kasou.agent import guard
from kasou.agent.app import Agent, create_agent_app
from kasou.agent.client import AgentClient
from kasou.agent.storage import LocalDisks
from kasou.api.app import create_app
from kasou.api.auth import ensure_token
from kasou.api.deps import Services
from kasou.config import (
    Paths,
    TlsFiles,
    api_listen,
    etcd_endpoints,
    etcd_metrics_endpoints,
    ha_times,
    host_name,
    uplink,
)
from kasou.control.hosts import Agents
from kasou.control.leader import Leadership
from kasou.errors import InvalidSpec
from kasou.hypervisor.qemu import accel
from kasou.hypervisor.qemu.driver import QemuDriver
from kasou.hypervisor.qemu.network import HostNetwork
from kasou.hypervisor.qemu.tls import prepare as qemu_tls_dir
from kasou.pki import TlsError, host_client_context, require, server_context
from kasou.store.etcd import EtcdStore
from kasou.store.sqlite import SqliteStore


def _logging(paths: Paths, name: str) -> None:
    logging.basicConfig(
        level=logging.INFO,
        format=f"%(asctime)s {name} %(levelname)s %(name)s: %(message)s",
    )


def tls_config(files: TlsFiles, client_certs: str) -> dict[str, Any]:
    """uvicorn's settings to serve HTTPS with this host's certificate (client certificates:
    ``required`` for agents, ``optional`` for the API, which also serves people's browsers)."""
    ctx = server_context(files, client_certs)

    def factory(_config: uvicorn.Config, _default: Any) -> ssl.SSLContext:
        return ctx

    return {"ssl_context_factory": factory}


TRUSTED_PROXIES_ENV = "KASOU_TRUSTED_PROXIES"


def uvicorn_settings() -> dict[str, Any]:
    """uvicorn's proxy settings for every server kasou runs. uvicorn believes ``X-Forwarded-For`` (and
    ``-Proto``) from 127.0.0.1 by default, so anyone on the host could name any client address, the one
    the audit log records: kasou believes it from nobody, unless ``KASOU_TRUSTED_PROXIES`` lists the
    addresses or networks of reverse proxies in front of the API (comma-separated). Between kasou's own
    hosts the client's address travels signed (``X-Kasou-Forwarded-For``, :mod:`kasou.api.audit`)."""
    raw = os.environ.get(TRUSTED_PROXIES_ENV, "").strip()
    if not raw:
        return {"proxy_headers": False}
    proxies = [p.strip() for p in raw.split(",") if p.strip()]
    for p in proxies:
        try:
            ipaddress.ip_network(p)  # an address, or a network such as 10.1.0.0/16
        except ValueError:
            raise InvalidSpec(f"{TRUSTED_PROXIES_ENV}: {p!r} is no IP address or network (e.g. 10.0.0.5, 10.1.0.0/16)",
                              field=TRUSTED_PROXIES_ENV) from None  # fmt: skip
    return {"proxy_headers": True, "forwarded_allow_ips": proxies}


def serve_unix(app: Any, path: str) -> None:
    """Serve ``app`` on the unix socket ``path``, connectable by its owner (root) only: mode 0600 from the
    bind on, since the socket's mode is all the authentication the agent has there. (uvicorn binding it
    itself would chmod it 0666.)"""
    if os.path.exists(path):
        os.unlink(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        sock.bind(path)
    finally:
        os.umask(old)
    os.chmod(path, 0o600)
    config = uvicorn.Config(app, uds=path, log_level="warning", **uvicorn_settings())
    try:
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        sock.close()


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def run_agent(paths: Paths, listen: str | None = None) -> None:
    """Run this host's agent in the foreground (``kasou agent``). On TCP it serves mutual TLS only:
    a caller must present a certificate signed by the site CA (the control planes' host certificates)."""
    tcp = bool(listen) and not str(listen).startswith("unix:")
    tls = tls_config(require(paths.tls_files(), "the agent on TCP"), "required") if tcp else {}
    paths.ensure()
    _logging(paths, "agent")
    decision = asyncio.run(accel.decide(paths.images))
    from kasou.image import KNOWN_IMAGES, load_image

    def images() -> list[str]:
        out = []
        for n in KNOWN_IMAGES:
            try:
                load_image(paths.images, n)
                out.append(n)
            except Exception:
                continue
        return out

    # With this host's TLS files, QEMU's migration and NBD streams to other hosts are TLS too.
    qemu_tls = qemu_tls_dir(paths.tls_files(), paths.run)
    driver = QemuDriver(
        run_dir=paths.vm_run, serial_log_dir=paths.logs / "serial", images_dir=paths.images,
        accelerator=decision.accelerator, network=HostNetwork(uplink()), tls_dir=qemu_tls,
    )  # fmt: skip
    agent = Agent(
        host=host_name(),
        driver=driver,
        disks=LocalDisks(paths.disks, paths.images, paths.shared),
        accelerator=decision.accelerator,
        accelerator_reason=decision.reason,
        qemu_version=decision.qemu_version,
        images=images,
        # Migration streams and NBD exports listen on the address the agent serves on.
        migration_address=_listen_host(listen) or "127.0.0.1",
        backup_dir=paths.backups,
    )
    app = create_agent_app(agent)
    if listen and not listen.startswith("unix:"):
        host, _, port = listen.rpartition(":")
        host = host or "127.0.0.1"
        config = uvicorn.Config(app, host=host, port=int(port), log_level="warning", **tls, **uvicorn_settings())
        endpoints = etcd_endpoints()
        if not endpoints:
            uvicorn.Server(config).run()
            return
        record = {
            "agent_url": f"https://{_url_host(host)}:{port}",
            "disks_dir": str(paths.disks),
            "shared_dir": str(paths.shared) if paths.shared else None,
            "accelerator": decision.accelerator,
        }
        asyncio.run(_serve_guarded(config, paths, record))
        return
    serve_unix(app, listen[len("unix:") :] if listen else str(paths.agent_socket))


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _listen_host(listen: str | None) -> str | None:
    if not listen or listen.startswith("unix:"):
        return None
    return listen.rpartition(":")[0].strip("[]") or None


GUARD_CHECK_EVERY_S = 2.0


def start_guard(paths: Paths, starting: subprocess.Popen[bytes] | None = None) -> subprocess.Popen[bytes] | None:
    """Start this host's guard (lease and self-fencing) unless one runs; the new process, or None.

    ``starting``: the guard this agent started last. While it lives it is left alone even if it
    does not hold the lock yet: a loaded host may take seconds to import Python, and a second
    guard started meanwhile would only find the lock taken and exit."""
    if starting is not None and starting.poll() is None:
        return None
    if guard.guard_running(paths):
        return None
    log_file = paths.logs / "guard.log"
    with open(log_file, "ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "kasou", "agent-guard"],
            stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True, close_fds=True,  # it outlives the agent: an agent restart keeps the lease
        )  # fmt: skip


async def _serve_guarded(config: uvicorn.Config, paths: Paths, record: dict[str, Any]) -> None:
    """Serve the agent while this host's guard keeps it in the cluster (and restart the guard if it dies)."""
    tmp = guard.record_file(paths).with_suffix(".tmp")
    tmp.write_text(json.dumps(record))
    os.replace(tmp, guard.record_file(paths))

    async def keep_guard() -> None:
        started: subprocess.Popen[bytes] | None = None
        while True:
            proc = start_guard(paths, started)
            if proc is not None:
                started = proc
                logging.getLogger("kasou.agent").warning("started the host guard (pid %d)", proc.pid)
            await asyncio.sleep(GUARD_CHECK_EVERY_S)

    task = asyncio.create_task(keep_guard(), name="guard")
    try:
        await uvicorn.Server(config).serve()
    finally:
        # The guard is left running: an agent that stops (or restarts) leaves its VMs and its lease alone.
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def run_guard(paths: Paths) -> None:
    """Run this host's guard in the foreground (``kasou agent-guard``, started by the agent)."""
    _logging(paths, "guard")
    endpoints = etcd_endpoints()
    if not endpoints:
        raise SystemExit("the host guard needs the cluster store: set KASOU_ETCD")
    try:
        metrics = etcd_metrics_endpoints(len(endpoints))
    except ValueError as e:
        raise SystemExit(str(e)) from None
    guard.run_guard(paths, host_name(), endpoints, ha_times(), metrics, etcd_tls(paths, endpoints))


def etcd_tls(paths: Paths, endpoints: list[str], ctx: ssl.SSLContext | None = None) -> ssl.SSLContext | None:
    """This host's client context for etcd on ``https://`` (the site CA, its certificate), else None;
    ``ctx``: that context made already (the control plane's, for agents and the leader)."""
    if not any(e.startswith("https://") for e in endpoints):
        return None
    return ctx or host_client_context(paths.tls_files())


def run_api(paths: Paths, address: str | None = None, plain_http: bool = False) -> None:
    """Run the control plane and the REST API in the foreground (``kasou serve``).

    It serves HTTPS with this host's certificate; plain HTTP only when asked for (``plain_http``)
    and bound to a loopback address. Client certificates are optional (people's browsers and the
    CLI have none); the control plane presents its host's certificate to agents and to the leader."""
    host, port = api_listen(address)
    proxies = uvicorn_settings()  # a bad KASOU_TRUSTED_PROXIES is refused before anything starts
    if plain_http and not is_loopback(host):
        raise TlsError(f"plain HTTP is served only on 127.0.0.1, not on {host}; leave out --plain-http to serve HTTPS")
    files = paths.tls_files()
    tls = {} if plain_http else tls_config(require(files, "the API on TCP"), "optional")
    endpoints = etcd_endpoints()
    peers: ssl.SSLContext | None = host_client_context(files) if endpoints else None
    paths.ensure()
    _logging(paths, "api")
    token = ensure_token(paths.token_file)
    scheme = "http" if plain_http else "https"

    async def factory() -> Services:
        me = host_name()
        if not endpoints:
            agents = Agents({me: AgentClient(me, uds=str(paths.agent_socket))})
            return Services.build(SqliteStore(paths.state_db), agents)
        store = EtcdStore(endpoints, tls=etcd_tls(paths, endpoints, peers))
        svc = Services.build(store, Agents(store=store, tls=peers))
        svc.leadership = Leadership(
            store, me, f"{scheme}://{_url_host(host)}:{port}", on_elected=svc.vms.startup,
            on_deposed=svc.vms.suspend, tls=peers,
        )  # fmt: skip
        return svc

    # Open event streams and consoles would otherwise hold a shutdown until they end: 5 s, then they are cut.
    config = uvicorn.Config(
        create_app(factory, token), host=host, port=port, log_level="warning", timeout_graceful_shutdown=5, **tls,
        **proxies,
    )  # fmt: skip
    uvicorn.Server(config).run()
