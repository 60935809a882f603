"""Start and stop the single-host services (agent, API) in the background, idempotently.

The services are ordinary processes in their own sessions; their pid files are
checked against /proc so a reused pid is never signalled. Stopping them never
stops a VM (QEMU runs daemonized, outside their process groups).

This is for the one-host demo and the tests. A host installed from the Debian package runs the
same services as systemd units (``kasou-agent.service``, ``kasou-api.service``, docs/install.md);
while they are active for this home, ``up`` and ``down`` refuse and say to use ``systemctl``.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import httpx

from kasou import settings
from kasou.api.auth import ensure_token
from kasou.config import Paths, api_url, check_settings, host_name
from kasou.errors import Conflict, KasouError, OperationTimeout
from kasou.hypervisor.qemu import process
from kasou.pki import host_client_context, trust

AGENT_START_TIMEOUT = 90.0  # the first start of a boot probes KVM (up to 15 s) before listening
API_START_TIMEOUT = 30.0
READY_TIMEOUT = 60.0  # after the services answer: until the control plane would place a VM
READY_MEMORY_MIB = 128  # the smallest VM a ready cluster must have room for
STOP_TIMEOUT = 15.0

SERVICES = ("agent", "api")
SYSTEMD_UNITS = ("kasou-agent.service", "kasou-api.service")
SYSTEMCTL_TIMEOUT = 5.0
DEFAULT_UNIT_HOME = "/var/lib/kasou"  # the units' KASOU_HOME unless kasou.env or kasou.toml sets one


def _systemctl(*args: str) -> subprocess.CompletedProcess[str] | None:
    exe = shutil.which("systemctl")
    if exe is None:
        return None
    try:
        return subprocess.run(
            [exe, *args], capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=SYSTEMCTL_TIMEOUT
        )
    except (OSError, subprocess.TimeoutExpired):
        return None


def _unit_home(unit: str) -> Path:
    """The kasou home a running unit's main process has: its environment's KASOU_HOME, else the settings file
    it reads (its KASOU_CONFIG, else /etc/kasou/kasou.toml), else the units' default."""
    r = _systemctl("show", "--property=MainPID", "--value", unit)
    pid = r.stdout.strip() if r is not None and r.returncode == 0 else ""
    env: dict[str, str] = {}
    if pid.isdigit() and int(pid) > 0:
        try:
            pairs = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            pairs = []
        for kv in pairs:
            k, sep, v = kv.decode(errors="replace").partition("=")
            if sep and k.startswith("KASOU_"):
                env[k] = v
    loaded = settings.load(env)
    if loaded.fatal is None and "paths.home" not in loaded.errors:
        return Path(loaded.settings.paths.home).absolute()
    return Path(DEFAULT_UNIT_HOME)


def systemd_units(paths: Paths) -> list[str]:
    """kasou's systemd units that are active for this home (none where systemctl is missing or
    systemd is not running: ``systemctl is-active`` then answers non-zero)."""
    active = []
    for unit in SYSTEMD_UNITS:
        r = _systemctl("is-active", "--quiet", unit)
        if r is not None and r.returncode == 0 and _unit_home(unit) == paths.home:
            active.append(unit)
    return active


def refuse_under_systemd(paths: Paths, verb: str) -> None:
    """``kasou up``/``down`` are for the one-host demo: refused, with the way out, while systemd runs
    kasou's services for this home."""
    units = systemd_units(paths)
    if units:
        raise Conflict(
            f"{', '.join(units)} {'is' if len(units) == 1 else 'are'} active: systemd runs kasou's services for "
            f"{paths.home} on this host, and 'kasou {verb}' is only for the one-host demo; use "
            f"'systemctl {'start' if verb == 'up' else 'stop'} kasou-agent kasou-api' (VMs keep running either way)"
        )


def agent_listen_setting() -> str | None:
    """The agent's TCP address in a cluster: ``--listen ADDRESS:PORT`` in ``KASOU_AGENT_OPTS`` (what its unit
    runs it with); None for the root-only unix socket of one host."""
    opts = os.environ.get("KASOU_AGENT_OPTS", "").split()
    if "--listen" in opts[:-1]:
        value = opts[opts.index("--listen") + 1]
        return None if value.startswith("unix:") else value
    return None


def _command(service: str, api: str, agent_listen: str | None = None) -> list[str]:
    """``api`` is KASOU_API as a URL: http:// on a loopback address is served as plain HTTP, explicitly;
    anything else (https://) with this host's certificate. ``agent_listen``: the agent on TCP (mutual TLS)."""
    if service == "agent":
        return [sys.executable, "-m", "kasou", "agent", *(["--listen", agent_listen] if agent_listen else [])]
    scheme, _, address = api.partition("://")
    plain = ["--plain-http"] if scheme == "http" else []
    return [sys.executable, "-m", "kasou", "serve", "--address", address, *plain]


def service_pid(paths: Paths, service: str) -> int | None:
    """The pid of a running service of this home, or None."""
    try:
        pid = int(paths.pidfile(service).read_text().strip())
    except (FileNotFoundError, ValueError):
        return None
    args = process.cmdline(pid) if process.alive(pid) else []
    verb = "agent" if service == "agent" else "serve"
    if "kasou" in args and verb in args:
        return pid
    return None


def _agent_ok(paths: Paths, listen: str | None = None) -> bool:
    try:
        if listen:  # mutual TLS: this host's own certificate is a kasou host's
            with httpx.Client(timeout=3, verify=host_client_context(paths.tls_files())) as c:
                return c.get(f"https://{listen}/agent/v1/ping").status_code == 200
        with httpx.Client(transport=httpx.HTTPTransport(uds=str(paths.agent_socket)), timeout=3) as c:
            return c.get("http://agent/agent/v1/ping").status_code == 200
    except httpx.HTTPError:
        return False


def _api_ok(url: str, token: str, paths: Paths) -> bool:
    try:
        headers = {"Authorization": f"Bearer {token}"}
        r = httpx.get(url + "/v1/version", headers=headers, timeout=3, verify=trust(paths.tls_files()))
        return r.status_code == 200
    except httpx.HTTPError:
        return False


def log_tail(path: Path, lines: int = 3) -> str:
    """The last lines of a service's log, on one line."""
    return _tail(path, lines)


def _tail(path: Path, lines: int = 3) -> str:
    try:
        text = [ln for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
        return " | ".join(text[-lines:])
    except FileNotFoundError:
        return ""


def _spawn(paths: Paths, service: str, api: str, agent_listen: str | None = None) -> int:
    log = paths.logs / f"{service}.log"
    env = dict(os.environ, KASOU_HOME=str(paths.home), KASOU_IMAGES=str(paths.images))
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            _command(service, api, agent_listen),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,  # not in the caller's process group: a Ctrl-C there does not reach it
            close_fds=True,
        )
    paths.pidfile(service).write_text(f"{proc.pid}\n")
    return proc.pid


def _wait(ok: Callable[[], bool], pid: int, timeout: float, service: str, paths: Paths) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ok():
            return
        if not process.alive(pid):
            why = _tail(paths.logs / f"{service}.log") or "no log output"
            raise KasouError(f"the {service} exited while starting: {why}")
        time.sleep(0.1)
    raise OperationTimeout(f"the {service} did not answer within {timeout:.0f} s; see {paths.logs}/{service}.log")


def not_ready(
    cluster: dict[str, Any], hosts: list[dict[str, Any]], expected: Iterable[str], memory_mib: int = READY_MEMORY_MIB
) -> str | None:
    """Why a ``vm create`` would not be placed yet (None: it would), from the control plane's answers
    to ``GET /v1/cluster`` and ``GET /v1/hosts``: no leader, a host of ``expected`` not registered or
    not answering, or no host with room for a VM of ``memory_mib``."""
    if not cluster.get("leader"):
        return "no control plane leader is elected yet"
    by_name = {str(h.get("name")): h for h in hosts}
    missing = [n for n in expected if n not in by_name]
    if missing:
        return f"{'hosts' if len(missing) > 1 else 'host'} {', '.join(missing)} not registered with the control plane"
    down = [n for n in expected if by_name[n].get("state") == "down"]
    if down:
        return f"the control plane gets no answer from the agent of {', '.join(down)}"
    room = [h for h in hosts if h.get("state") == "up" and (h.get("cpus") or 0) > 0
            and (h.get("memory_free_mib") or 0) >= memory_mib]  # fmt: skip
    if not room:
        return f"no host is up with room for a VM of {memory_mib} MiB (in maintenance or full)"
    return None


def wait_ready(
    ask: Callable[[], tuple[dict[str, Any], list[dict[str, Any]]]],
    expected: Iterable[str],
    timeout: float = READY_TIMEOUT,
    every: float = 0.25,
) -> float:
    """Wait until the control plane would place a VM (``ask`` returns its cluster and hosts views, and
    raises :class:`KasouError` while it cannot answer). Returns the seconds waited; raises
    :class:`OperationTimeout` with the last reason after ``timeout``."""
    names = list(expected)
    t0 = time.monotonic()
    while True:
        try:
            why = not_ready(*ask(), names)
        except KasouError as e:
            why = e.message
        if why is None:
            return time.monotonic() - t0
        if time.monotonic() - t0 > timeout:
            raise OperationTimeout(f"the cluster did not accept work within {timeout:.0f} s: {why}")
        time.sleep(every)


def _ask_api(url: str, token: str, paths: Paths) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    headers = {"Authorization": f"Bearer {token}"}
    try:
        with httpx.Client(base_url=url, headers=headers, timeout=5, verify=trust(paths.tls_files())) as c:
            cluster, hosts = c.get("/v1/cluster"), c.get("/v1/hosts")
    except httpx.HTTPError as e:
        raise KasouError(f"the API at {url} does not answer: {e}") from None
    if cluster.status_code != 200 or hosts.status_code != 200:
        raise KasouError(f"the API at {url} answers {cluster.status_code}/{hosts.status_code}")
    return dict(cluster.json()), list(hosts.json())


def up(paths: Paths, api: str | None = None, agent_listen: str | None = None) -> dict[str, str]:
    """Start whatever is not running yet. Returns what was done per service. ``agent_listen``: the agent's
    TCP address (a cluster's host), default from ``KASOU_AGENT_OPTS``; else its unix socket."""
    check_settings()  # a bad KASOU_* value is refused here, before anything starts
    refuse_under_systemd(paths, "up")
    paths.ensure()
    token = ensure_token(paths.token_file)
    url = api_url(api)
    listen = agent_listen or agent_listen_setting()
    done = {}
    pid = service_pid(paths, "agent")
    if pid is not None and _agent_ok(paths, listen):
        done["agent"] = f"already running (pid {pid})"
    else:
        if pid is not None:
            _terminate(pid)
        pid = _spawn(paths, "agent", url, listen)
        _wait(lambda: _agent_ok(paths, listen), pid, AGENT_START_TIMEOUT, "agent", paths)
        done["agent"] = f"started (pid {pid})"
    pid = service_pid(paths, "api")
    if pid is not None and _api_ok(url, token, paths):
        done["api"] = f"already running (pid {pid}) at {url}"
    else:
        if pid is not None:
            _terminate(pid)
        pid = _spawn(paths, "api", url)
        _wait(lambda: _api_ok(url, token, paths), pid, API_START_TIMEOUT, "api", paths)
        done["api"] = f"started (pid {pid}) at {url}"
    # Answering is not enough: return once a `vm create` would be placed (this host's agent counted).
    wait_ready(lambda: _ask_api(url, token, paths), [host_name()], READY_TIMEOUT)
    return done


def terminate(pid: int) -> None:
    """SIGTERM, then SIGKILL after 15 s (by pid)."""
    _terminate(pid)


def _terminate(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + STOP_TIMEOUT
    while process.alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    if process.alive(pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + 5
        while process.alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)


def down(paths: Paths) -> dict[str, str]:
    """Stop the API, then the agent. VMs keep running."""
    refuse_under_systemd(paths, "down")
    done = {}
    for service in ("api", "agent"):
        pid = service_pid(paths, service)
        if pid is None:
            done[service] = "not running"
        else:
            _terminate(pid)
            done[service] = f"stopped (pid {pid})"
        paths.pidfile(service).unlink(missing_ok=True)
    return done


def status(paths: Paths) -> dict[str, int | None]:
    return {s: service_pid(paths, s) for s in SERVICES}
