"""The host agent's process (``kasou agent``) and its guard's (``kasou agent-guard``), each run by uvicorn:
the QEMU driver, this host's disks and images, and the lease that keeps the host in the cluster."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import subprocess
import sys
from typing import Any

import uvicorn

from kasou.agent import guard
from kasou.agent.app import Agent, create_agent_app
from kasou.agent.storage import LocalDisks
from kasou.config import Paths, etcd_endpoints, etcd_metrics_endpoints, ha_times, host_name, uplink
from kasou.hypervisor.qemu import accel
from kasou.hypervisor.qemu.driver import QemuDriver
from kasou.hypervisor.qemu.network import HostNetwork
from kasou.hypervisor.qemu.tls import prepare as qemu_tls_dir
from kasou.pki import require
from kasou.serving import etcd_tls, log_to_stderr, serve_unix, tls_config, url_host, uvicorn_settings


def run_agent(paths: Paths, listen: str | None = None) -> None:
    """Run this host's agent in the foreground (``kasou agent``). On TCP it serves mutual TLS only:
    a caller must present a certificate signed by the site CA (the control planes' host certificates)."""
    tcp = bool(listen) and not str(listen).startswith("unix:")
    tls = tls_config(require(paths.tls_files(), "the agent on TCP"), "required") if tcp else {}
    paths.ensure()
    log_to_stderr("agent")
    decision = asyncio.run(accel.decide(paths.images))
    from kasou.image import list_images

    def images() -> list[str]:
        return [a.name for a in list_images(paths.images)]

    # With this host's TLS files, QEMU's migration and NBD streams to other hosts are TLS too.
    qemu_tls = qemu_tls_dir(paths.tls_files(), paths.run)
    etcd = etcd_endpoints()
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
        transfer_dir=paths.transfer,
        known_hosts=guard.host_registry(etcd, etcd_tls(paths.tls_files(), etcd))
        if tcp and etcd
        else None,  # kasou.peers
        revoked=guard.revoked_registry(etcd, etcd_tls(paths.tls_files(), etcd)) if tcp and etcd else None,
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
            "agent_url": f"https://{url_host(host)}:{port}",
            "disks_dir": str(paths.disks),
            "shared_dir": str(paths.shared) if paths.shared else None,
            "accelerator": decision.accelerator,
        }
        asyncio.run(_serve_guarded(config, paths, record))
        return
    serve_unix(app, listen[len("unix:") :] if listen else str(paths.agent_socket))


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
    log_to_stderr("guard")
    endpoints = etcd_endpoints()
    if not endpoints:
        raise SystemExit("the host guard needs the cluster store: set KASOU_ETCD")
    try:
        metrics = etcd_metrics_endpoints(len(endpoints))
    except ValueError as e:
        raise SystemExit(str(e)) from None
    guard.run_guard(paths, host_name(), endpoints, ha_times(), metrics, etcd_tls(paths.tls_files(), endpoints))
