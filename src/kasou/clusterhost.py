"""This host's side of ``kasou cluster init``, ``join`` and ``leave``: its files, its etcd member, its services.

Files (``KASOU_CONFIG_DIR``, default ``/etc/kasou``):

- ``cluster.env``: this host's cluster settings (``KASOU_*``, one ``NAME=value`` a line), which
  ``kasou-agent.service`` and ``kasou-api.service`` read after ``kasou.env`` (so they win over it). Written
  by :func:`write_settings` alone; not a conffile of the package, so an upgrade never asks about it.
- ``etcd.env``: the etcd member's settings as etcd's own ``ETCD_*`` variables, read by
  ``kasou-etcd.service`` (and given to the etcd process started without systemd).
- ``api.token``, ``secrets.key``: the site's shared API token and secrets key (0600; the same on every host).

The member's data is in ``KASOU_HOME/etcd``; its certificate (the site CA's, without kasou's host
marker: etcd is not a kasou host) in ``KASOU_TLS_DIR/etcd``.

Under systemd (``/run/systemd/system`` exists) the units are enabled and (re)started; without it (a
container, the tests' network namespaces) etcd runs as a process in a session of its own (pid file
``run/etcd.pid``, log ``log/etcd.log``) and the agent and API as ``kasou up`` starts them.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import httpx

from kasou import pki, services
from kasou.config import Paths, TlsFiles
from kasou.errors import KasouError, OperationTimeout
from kasou.hypervisor.qemu import process
from kasou.model.cluster import (
    AGENT_PORT,
    API_PORT,
    ETCD_CLIENT_PORT,
    ETCD_METRICS_PORT,
    ETCD_PEER_PORT,
    Member,
    metrics_url,
    url,
)
from kasou.settings import sources as settings_sources

SETTINGS_FILE = "cluster.env"
ETCD_FILE = "etcd.env"
UNITS = ("kasou-etcd.service", "kasou-agent.service", "kasou-api.service")
ETCD_TIMEOUT = 60.0
SYSTEMCTL_TIMEOUT = 90.0
_VALUE = re.compile(r"^[A-Za-z0-9_./:,=@+\- ]*$")


class ClusterSetupError(KasouError):
    """Setting up this host for a cluster failed (what failed, in one line)."""


def config_dir() -> Path:
    return settings_sources.config_dir(os.environ)


def under_systemd() -> bool:
    """Is systemd this machine's service manager (sd_booted(3))? ``KASOU_SYSTEMD=0`` says no."""
    if os.environ.get("KASOU_SYSTEMD", "").strip() == "0":
        return False
    return Path("/run/systemd/system").is_dir() and shutil.which("systemctl") is not None


# -- the settings: one function writes them -----------------------------------------------------------


def _write_env(path: Path, values: dict[str, str], header: str) -> Path:
    lines = [header]
    for k, v in values.items():
        if not re.fullmatch(r"[A-Z][A-Z0-9_]*", k) or not _VALUE.fullmatch(v):
            raise ClusterSetupError(f"cannot write {k}={v!r} to {path}: not a plain NAME=value")
        lines.append(f"{k}={v}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("\n".join(lines) + "\n")
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
    return path


def write_settings(directory: Path, values: dict[str, str]) -> Path:
    """Write this host's cluster settings (``KASOU_*``): the one place that does, so that where they go
    (an environment file the units read today) can change in one place."""
    header = (
        "# This host's cluster settings, written by kasou cluster init/join (kasou cluster leave removes them).\n"
        "# Read by kasou-agent.service and kasou-api.service after kasou.env, and by every kasou command on\n"
        "# this host under its own environment (docs/configuration.md)."
    )
    return _write_env(directory / SETTINGS_FILE, values, header)


def read_env(path: Path) -> dict[str, str]:
    """One of the files this module writes (or any environment file), as the units read it."""
    return settings_sources.read_env_file(path, unreadable_ok=False)


def read_settings(directory: Path) -> dict[str, str]:
    return read_env(directory / SETTINGS_FILE)


def apply_settings(values: dict[str, str]) -> None:
    """Make the settings this process's (the services it starts inherit them)."""
    os.environ.update(values)


def host_settings(name: str, address: str, paths: Paths, directory: Path, members: list[Member]) -> dict[str, str]:
    """A cluster host's settings: its name, its API (HTTPS) and agent (mutual TLS) on ``address``, every etcd
    member (their metrics listeners in the same order), the site's shared token file."""
    clients = [m.client_url or "" for m in members]
    return {
        "KASOU_HOST_NAME": name,
        "KASOU_HOME": str(paths.home),
        "KASOU_API": url(address, API_PORT),
        "KASOU_SERVE_OPTS": "",
        "KASOU_AGENT_OPTS": f"--listen {address}:{AGENT_PORT}",
        "KASOU_ETCD": ",".join(clients),
        "KASOU_ETCD_METRICS": ",".join(metrics_url(c) for c in clients),
        "KASOU_TOKEN_FILE": str(directory / "api.token"),
    }


# -- the etcd member ----------------------------------------------------------------------------------


def etcd_tls(paths: Paths) -> TlsFiles:
    d = paths.etcd_tls_dir
    return TlsFiles(ca=d / "ca.crt", cert=d / "host.crt", key=d / "host.key")


def etcd_data(paths: Paths) -> Path:
    return paths.home / "etcd"


def etcd_settings(
    name: str, address: str, paths: Paths, members: list[Member], state: str, cluster_token: str, crl: bool = True
) -> dict[str, str]:
    """The member's settings as etcd reads them from its environment (``ETCD_*``): mutual TLS with the site
    CA for clients and peers, its metrics listener for the hosts' guards (docs/operations.md); with ``crl``,
    the site's revocation list, which etcd reads at each new connection (it must exist before etcd starts)."""
    tls = etcd_tls(paths)
    cert, key, ca = str(tls.cert), str(tls.key), str(tls.ca)
    revocations = {"ETCD_CLIENT_CRL_FILE": str(paths.etcd_crl), "ETCD_PEER_CRL_FILE": str(paths.etcd_crl)}
    return {
        **(revocations if crl else {}),
        "ETCD_NAME": name,
        "ETCD_DATA_DIR": str(etcd_data(paths)),
        "ETCD_LISTEN_CLIENT_URLS": url(address, ETCD_CLIENT_PORT),
        "ETCD_ADVERTISE_CLIENT_URLS": url(address, ETCD_CLIENT_PORT),
        "ETCD_LISTEN_PEER_URLS": url(address, ETCD_PEER_PORT),
        "ETCD_INITIAL_ADVERTISE_PEER_URLS": url(address, ETCD_PEER_PORT),
        "ETCD_LISTEN_METRICS_URLS": url(address, ETCD_METRICS_PORT),
        "ETCD_INITIAL_CLUSTER": ",".join(f"{m.name}={m.peer_url}" for m in members),
        "ETCD_INITIAL_CLUSTER_STATE": state,
        "ETCD_INITIAL_CLUSTER_TOKEN": cluster_token,
        "ETCD_CERT_FILE": cert,
        "ETCD_KEY_FILE": key,
        "ETCD_TRUSTED_CA_FILE": ca,
        "ETCD_CLIENT_CERT_AUTH": "true",
        "ETCD_PEER_CERT_FILE": cert,
        "ETCD_PEER_KEY_FILE": key,
        "ETCD_PEER_TRUSTED_CA_FILE": ca,
        "ETCD_PEER_CLIENT_CERT_AUTH": "true",
        "ETCD_LOGGER": "zap",
        "ETCD_LOG_OUTPUTS": "stderr",
        # etcd 3.4 warns "ignoring common name in gRPC-gateway proxy request" on every request that comes through
        # its JSON gateway with a client certificate, i.e. every request of kasou's: several lines a second that
        # push everything else out of the journal. Errors only; the hosts' guards watch the members' health.
        "ETCD_LOG_LEVEL": "error",
    }


def write_etcd_settings(directory: Path, values: dict[str, str]) -> Path:
    header = "# This host's etcd member, written by kasou cluster init/join; read by kasou-etcd.service."
    return _write_env(directory / ETCD_FILE, values, header)


def etcd_binary() -> str:
    exe = shutil.which("etcd") or ("/usr/bin/etcd" if Path("/usr/bin/etcd").exists() else None)
    if exe is None:
        raise ClusterSetupError("etcd is not installed: apt install etcd-server (kasou runs its own member, "
                                "kasou-etcd.service; Debian's etcd.service is not used)")  # fmt: skip
    return exe


def etcd_pid(paths: Paths) -> int | None:
    try:
        pid = int(paths.pidfile("etcd").read_text().strip())
    except (FileNotFoundError, ValueError):
        return None
    args = process.cmdline(pid) if process.alive(pid) else []
    return pid if args and Path(args[0]).name == "etcd" else None


def start_etcd(paths: Paths, directory: Path, systemd: bool) -> str:
    """Start the member (its unit, or a process) and wait until it is healthy; one line of what it did."""
    values = read_env(directory / ETCD_FILE)
    client = values["ETCD_ADVERTISE_CLIENT_URLS"]
    t0 = time.monotonic()
    pid = None
    if systemd:
        systemctl("daemon-reload")
        systemctl("enable", "--now", "kasou-etcd.service")
    else:
        exe = etcd_binary()
        paths.ensure()
        env = {k: v for k, v in os.environ.items() if not k.startswith("ETCD_")}
        env.update(values)
        with open(paths.logs / "etcd.log", "ab") as log:
            proc = subprocess.Popen([exe], stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env,
                                    start_new_session=True, close_fds=True)  # fmt: skip
        pid = proc.pid
        paths.pidfile("etcd").write_text(f"{pid}\n")
    wait_etcd(client, paths.tls_files(), ETCD_TIMEOUT, pid, paths.logs / "etcd.log")
    how = "kasou-etcd.service" if systemd else f"pid {pid}"
    return f"etcd: member {values['ETCD_NAME']} at {client} healthy after {time.monotonic() - t0:.1f} s ({how})"


def wait_etcd(client_url: str, tls: TlsFiles, timeout: float, pid: int | None, log: Path) -> None:
    deadline = time.monotonic() + timeout
    ctx = pki.host_client_context(tls)
    with httpx.Client(timeout=2.0, verify=ctx) as c:
        while True:
            try:
                r = c.get(f"{client_url}/health")
                if r.status_code == 200 and r.json().get("health") == "true":
                    return
            except (httpx.HTTPError, ValueError):
                pass
            if pid is not None and not process.alive(pid):
                raise ClusterSetupError(f"etcd exited while starting: {services.log_tail(log)}")
            if time.monotonic() > deadline:
                raise OperationTimeout(f"the etcd member at {client_url} is not healthy after {timeout:.0f} s "
                                       f"(see {log if pid else 'journalctl -u kasou-etcd'})")  # fmt: skip
            time.sleep(0.2)


def stop_etcd(paths: Paths, systemd: bool) -> str:
    if systemd:
        systemctl("disable", "--now", "kasou-etcd.service")
        return "etcd: kasou-etcd.service stopped and disabled"
    pid = etcd_pid(paths)
    paths.pidfile("etcd").unlink(missing_ok=True)
    if pid is None:
        return "etcd: not running"
    services.terminate(pid)
    return f"etcd: stopped (pid {pid})"


# -- the agent and the API ----------------------------------------------------------------------------


def systemctl(*args: str) -> None:
    exe = shutil.which("systemctl") or "systemctl"
    try:
        r = subprocess.run([exe, *args], capture_output=True, text=True, stdin=subprocess.DEVNULL,
                           timeout=SYSTEMCTL_TIMEOUT)  # fmt: skip
    except (OSError, subprocess.TimeoutExpired) as e:
        raise ClusterSetupError(f"systemctl {' '.join(args)} failed: {e}") from None
    if r.returncode != 0:
        why = (r.stderr or r.stdout).strip().splitlines()
        raise ClusterSetupError(f"systemctl {' '.join(args)} failed: {why[-1] if why else r.returncode}")


def start_services(paths: Paths, systemd: bool) -> list[str]:
    """The agent and the API with this host's cluster settings (already in the environment)."""
    if systemd:
        systemctl("enable", "kasou-agent.service", "kasou-api.service")
        # restart: a unit that ran with the single-host settings takes the cluster's (VMs keep running)
        systemctl("restart", "kasou-agent.service", "kasou-api.service")
        return ["agent, api: kasou-agent.service, kasou-api.service (re)started with the cluster's settings"]
    listen = services.agent_listen_setting()
    return [f"{k}: {v}" for k, v in services.up(paths, agent_listen=listen).items()]


def guard_pids(paths: Paths) -> list[int]:
    """This home's host guard (it outlives the agent, by design: it must be ended on its own when the host
    leaves the cluster)."""
    found = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        pid = int(d.name)
        args = process.cmdline(pid)
        if "agent-guard" not in args or "kasou" not in args:
            continue
        try:
            env = (d / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        home = next((e.split(b"=", 1)[1].decode() for e in env if e.startswith(b"KASOU_HOME=")), "/var/lib/kasou")
        if Path(home).absolute() == paths.home.absolute():
            found.append(pid)
    return found


def stop_services(paths: Paths, systemd: bool) -> list[str]:
    """Stop the API, the agent and its guard (VMs are not touched: leave refuses while any runs here)."""
    done = []
    if systemd:
        with contextlib.suppress(ClusterSetupError):
            systemctl("stop", "kasou-api.service", "kasou-agent.service")
        done.append("agent, api: kasou-agent.service, kasou-api.service stopped")
    else:
        done += [f"{k}: {v}" for k, v in services.down(paths).items()]
    for pid in guard_pids(paths):
        services.terminate(pid)
        done.append(f"guard: stopped (pid {pid})")
    return done


def write_site_file(path: Path, text: str) -> None:
    """A site file (the API token, a key) with mode 0600 from its first byte."""
    pki.write_secret(path, text.encode())
