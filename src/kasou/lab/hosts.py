"""``kasou lab``: a real multi-host kasou environment on one machine.

Every virtual host is a network namespace running the production services; every
packet between hosts crosses a veth link, so cutting a link is a real partition and
killing a host's processes is a real power loss. Root only.

Layout (``LAB`` is ``KASOU_LAB_DIR``, default ``/var/lib/kasou/lab``)::

    root namespace
      bridge klab0            10.88.0.1/24; etcd listens here (every host reaches it)
      etcd m0, m1, m2         https://10.88.0.1:2379, :2381, :2383 (peers :2380, :2382, :2384; metrics
                              :2385-:2387), mutual TLS with LAB/etcd-tls (signed by the lab CA)
      veth klab-h1 ──┐        port of klab0; "partition h1" sets it down
      veth klab-h2 ──┤ ...
      bridge klab-vm          the VM traffic switch: no address, a plain bridge (a trunk: it
                              forwards the hosts' 802.1Q-tagged frames as they are)
      veth klabv-h1 ──┐       port of klab-vm
      veth klabv-h2 ──┤ ...
    netns klab-h{i}            host h{i}, i = 1..N
      eth0 10.88.0.{10+i}/24, lo up, default route via 10.88.0.1
      vmnet0                  up, no address: the host's uplink for VM networks (KASOU_UPLINK)
      kasou agent --listen 10.88.0.{10+i}:8471
      kasou serve --address 10.88.0.{10+i}:8470
      QEMU processes started by that agent (they inherit its namespace)
    netns klab-backup          with --backup-server: kasou backup-server serve, 10.88.0.5 (:mod:`kasou.lab.vault`)
    netns klab-dir             with --directory: a Samba AD DC, ldaps://10.88.0.6 (:mod:`kasou.lab.directory`)

    LAB/lab.json              state: every name, address and pid made (so down, kill, partition
                              and a re-run of up work after a crash, and are idempotent)
    LAB/api.token             the one API token of the lab (0600)
    LAB/tls/                  the lab's site CA (ca.crt, ca.key 0600); each host's certificate (its
                              name and address as SANs) is in LAB/h{i}/home/tls/: every API serves
                              HTTPS, every agent mutual TLS, as in production
    LAB/shared/               the lab's "shared storage": every host sees the same directory
    LAB/etcd/                 member data (m0.etcd, ...) and logs (m0.log, ...)
    LAB/h{i}/home/            the host's KASOU_HOME
    LAB/h{i}/log/             agent.log, api.log (the services' output)

Each service runs in the host's network namespace ``klab-h{i}`` (:func:`kasou.lab.net.in_netns`: a /sys of that
namespace, as ``ip netns exec`` gives, with the machine's cgroups kept, so its QEMUs are confined in cgroups as on
a real host) in its own session,
with ``KASOU_HOME``, ``KASOU_HOST_NAME=h{i}``, ``KASOU_IMAGES`` (the caller's),
``KASOU_SHARED_DIR=LAB/shared``, ``KASOU_ETCD`` (the member URLs), ``KASOU_TOKEN_FILE=LAB/api.token``,
``KASOU_API`` (its own https URL), ``KASOU_UPLINK=vmnet0`` and ``KASOU_STORAGE_ROOTS`` (the caller's, and
``LAB``: pools in the lab's directory); ``KASOU_ACCEL`` passes through only if
the caller set it. The agents make the VM networks' bridges, VLAN ports and taps inside their own
namespaces, which go with them; a VM's private addresses never leave the lab's namespaces and
its ``klab-vm`` bridge.

``up`` is a repair as well as a start: run again, it recreates what is missing, restarts
dead services and etcd members (on their data) and heals cut links. If it fails it undoes
what that run made (all of the lab, if it made the lab) and says why in one line. ``down``
SIGKILLs every process of the lab by pid (the recorded ones, every process in a host's
namespace, every QEMU or etcd whose command line names a lab path), then deletes the
namespaces, links, bridge and ``LAB``; it works on a half-made lab too.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import httpx

from kasou import pki
from kasou.api.auth import ensure_token
from kasou.config import Paths, TlsFiles, storage_roots
from kasou.errors import InvalidSpec, KasouError
from kasou.hypervisor.qemu import confine
from kasou.lab import directory as labdir
from kasou.lab import net, vault
from kasou.lab.etcd import EtcdCluster
from kasou.lab.net import LabError
from kasou.lab.procs import (
    api_get,
    is_etcd,
    is_service,
    kill_all,
    log_tail,
    marked_processes,
    preflight,
    probe,
    terminate,
)
from kasou.lab.state import (
    ETCD_BASE_PORT,
    ETCD_MEMBERS,
    ETCD_TIMEOUT,
    GATEWAY,
    GONE_TIMEOUT,
    MAX_HOSTS,
    PREFIXLEN,
    SERVICE_TIMEOUT,
    SERVICES,
    STATE_FILE,
    SUBNET,
    VM_UPLINK,
    EtcdMember,
    LabHost,
    LabState,
    lab_dir,
)
from kasou.services import wait_ready

# -- the lab --------------------------------------------------------------------------------------


class Lab:
    """The lab in one directory. Every method that changes it takes the directory's lock."""

    def __init__(self, directory: Path | None = None) -> None:
        self.dir = Path(directory or lab_dir()).absolute()

    @property
    def state_file(self) -> Path:
        return self.dir / STATE_FILE

    @property
    def token_file(self) -> Path:
        return self.dir / "api.token"

    @property
    def tls_dir(self) -> Path:
        """The lab's site CA (the machine that runs the lab plays the site's CA)."""
        return self.dir / "tls"

    @property
    def ca_file(self) -> Path:
        return self.tls_dir / "ca.crt"

    @property
    def etcd_tls(self) -> TlsFiles:
        """The etcd members' certificate (the bridge address as SAN), signed by the lab's CA."""
        d = self.dir / "etcd-tls"
        return TlsFiles(ca=d / "ca.crt", cert=d / "host.crt", key=d / "host.key")

    @property
    def shared_dir(self) -> Path:
        return self.dir / "shared"

    @property
    def etcd_dir(self) -> Path:
        return self.dir / "etcd"

    # -- state

    def load(self) -> LabState | None:
        try:
            return LabState.from_dict(json.loads(self.state_file.read_text()))
        except FileNotFoundError:
            return None
        except (ValueError, KeyError, TypeError) as e:
            raise LabError(f"the lab state {self.state_file} is unreadable ({e}); remove the lab by hand") from e

    def require(self) -> LabState:
        st = self.load()
        if st is None:
            raise LabError(f"there is no lab at {self.dir} (start one with: kasou lab up)")
        return st

    def _save(self, st: LabState) -> None:
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(st), indent=2) + "\n")
        os.replace(tmp, self.state_file)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        fd = os.open(self.dir / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise LabError(f"another kasou lab command is working on {self.dir}") from None
            yield
        finally:
            os.close(fd)

    def _plan(self, count: int) -> LabState:
        hosts = [
            LabHost(
                name=f"h{i}",
                index=i,
                netns=f"klab-h{i}",
                veth=f"klab-h{i}",
                address=f"{SUBNET}.{10 + i}",
                dir=str(self.dir / f"h{i}"),
                vm_veth=f"klabv-h{i}",
            )
            for i in range(1, count + 1)
        ]
        cluster = self._cluster()
        members = [
            EtcdMember(name=n, client_url=c, peer_url=p, metrics_url=m)
            for n, c, p, m in zip(
                cluster.names, cluster.endpoints, cluster.peer_urls, cluster.metrics_urls, strict=True
            )
        ]
        images = Paths.from_env().images
        return LabState(dir=str(self.dir), images=str(images), hosts=hosts, etcd=members)

    def _cluster(self) -> EtcdCluster:
        return EtcdCluster(
            self.etcd_dir, members=ETCD_MEMBERS, base_port=ETCD_BASE_PORT, host=GATEWAY, tls=self.etcd_tls
        )

    def _token(self) -> str | None:
        try:
            return self.token_file.read_text().strip() or None
        except OSError:
            return None

    # -- up

    def up(
        self, count: int, timeout: float = SERVICE_TIMEOUT, backup_server: bool = False, directory: bool = False
    ) -> list[str]:
        """Make (or repair) a lab of ``count`` hosts (and a backup server: :mod:`kasou.lab.vault`); one report
        line per piece. A lab that has a backup server keeps it."""
        preflight()
        if not 1 <= count <= MAX_HOSTS:
            raise InvalidSpec(f"--hosts must be between 1 and {MAX_HOSTS}, not {count}", field="hosts")
        made_dir = not self.dir.exists()
        self.dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.dir, 0o700)
        with self._locked():
            st = self.load()
            fresh = st is None
            if st is not None and len(st.hosts) != count:
                raise LabError(
                    f"the lab at {self.dir} has {len(st.hosts)} hosts, not {count}; "
                    "remove it first with: kasou lab down"
                )
            if st is None:
                st = self._plan(count)
                st.backup_server = vault.plan(self.dir) if backup_server else None
                st.directory = labdir.plan(self.dir) if directory else None
                try:
                    self._check_free(st)
                except LabError:
                    if made_dir:
                        shutil.rmtree(self.dir, ignore_errors=True)
                    raise
                self._save(st)
            elif backup_server and st.backup_server is None:
                st.backup_server = vault.plan(self.dir)
            if not fresh and directory and st.directory is None:
                st.directory = labdir.plan(self.dir)
            undo: list[Callable[[], Any]] = []
            try:
                return self._build(st, undo, timeout)
            except BaseException as e:
                undone = self._undo(st, fresh, undo)
                if not isinstance(e, Exception):
                    raise
                why = e.message if isinstance(e, KasouError) else f"{type(e).__name__}: {e}"
                raise LabError(f"lab up failed: {why} ({undone})") from e

    def _undo(self, st: LabState, fresh: bool, undo: list[Callable[[], Any]]) -> str:
        """After a failed up: remove the lab it made, or undo what a repairing run made."""
        if fresh:
            try:
                self._teardown(st)
            except Exception as e:
                msg = e.message if isinstance(e, KasouError) else str(e)
                return f"and could not remove all of it: {msg}"
            return "removed what it had made"
        for step in reversed(undo):
            with contextlib.suppress(Exception):
                step()
        with contextlib.suppress(Exception):
            self._save(st)
        return "undid what this run had made"

    def _check_free(self, st: LabState) -> None:
        """A new lab must not take over another lab's bridge, links or namespaces."""
        links = [st.bridge, st.vm_bridge, *(h.veth for h in st.hosts), *(h.vm_veth for h in st.hosts)]
        extra = [x for x in (st.backup_server, st.directory) if x is not None]
        spaces = [h.netns for h in st.hosts] + [x.netns for x in extra]
        taken = [n for n in links + [x.veth for x in extra] if net.link_exists(n)]
        taken += [f"netns {n}" for n in spaces if net.netns_exists(n)]
        if taken:
            raise LabError(
                f"{', '.join(taken)} {'exists' if len(taken) == 1 else 'exist'} already, but the lab at "
                f"{self.dir} did not make {'it' if len(taken) == 1 else 'them'} (a lab of another "
                "KASOU_LAB_DIR? remove it with kasou lab down there)"
            )

    def _build(self, st: LabState, undo: list[Callable[[], Any]], timeout: float) -> list[str]:
        t0 = time.monotonic()
        report = []
        token = ensure_token(self.token_file)
        os.chmod(self.token_file, 0o600)
        self.shared_dir.mkdir(exist_ok=True)
        if net.ensure_bridge(st.bridge, GATEWAY, PREFIXLEN):
            undo.append(functools.partial(net.delete_link, st.bridge))
        report.append(f"bridge {st.bridge}: {GATEWAY}/{PREFIXLEN}")
        if net.ensure_bridge(st.vm_bridge):
            undo.append(functools.partial(net.delete_link, st.vm_bridge))
        report.append(f"bridge {st.vm_bridge}: VM traffic, each host's {VM_UPLINK} on it")
        for h in st.hosts:
            if net.ensure_netns(h.netns):
                undo.append(functools.partial(net.remove_netns, h.netns))
            if net.ensure_host_link(h.veth, h.netns, st.bridge, h.address, PREFIXLEN, GATEWAY):
                undo.append(functools.partial(net.delete_link, h.veth))
            if net.ensure_vm_link(h.vm_veth, h.netns, st.vm_bridge, VM_UPLINK):
                undo.append(functools.partial(net.delete_link, h.vm_veth))
            for d in (h.home, h.log_dir):
                d.mkdir(parents=True, exist_ok=True)
                os.chmod(d, 0o700)
        report.append(self._certificates(st))

        t_etcd = time.monotonic()
        self._etcd_up(st, undo)
        members = ", ".join(f"{m.name} {m.client_url} (pid {m.pid})" for m in st.etcd)
        report.append(f"etcd: {members}; healthy after {time.monotonic() - t_etcd:.1f} s")

        started: dict[tuple[str, str], int] = {}
        for h in st.hosts:
            for service in SERVICES:
                if is_service(h, service, h.pid(service)):
                    continue
                pid = self._spawn(st, h, service)
                h.set_pid(service, pid)
                started[(h.name, service)] = pid
                undo.append(functools.partial(kill_all, {pid}))
                self._save(st)
        if st.backup_server is not None:  # it starts while the hosts' services do
            report.append(vault.ensure(st.backup_server, st.bridge, undo, timeout))
            self._save(st)
        if st.directory is not None:
            report.append(labdir.ensure(st.directory, st.bridge, self.ca_file.parent, undo, timeout))
            self._save(st)
        t_services = time.monotonic()
        self._wait_answering(st, token, timeout)
        report.append(f"services: all answer after {time.monotonic() - t_services:.1f} s")
        # Answering is not accepting work: wait until the leader counts every agent and would place a VM.
        waited = wait_ready(lambda: self._views(st, token), [h.name for h in st.hosts], timeout)
        report.append(f"cluster: leader elected, {len(st.hosts)} agents registered, ready after {waited:.1f} s more")
        if st.backup_server is not None:
            report.append(vault.configure(st.backup_server, st.hosts[0].api_url, self.ca_file, token))
        if st.directory is not None:
            report.append(labdir.configure(st.directory, st.hosts[0].api_url, self.ca_file, token))
        for h in st.hosts:
            what = {s: ("started" if (h.name, s) in started else "running") + f" pid {h.pid(s)}" for s in SERVICES}
            report.append(
                f"{h.name} {h.address} (netns {h.netns}): agent {what['agent']} {h.agent_url}, "
                f"api {what['api']} {h.api_url}"
            )
        report.append(f"lab up: {len(st.hosts)} hosts in {time.monotonic() - t0:.1f} s ({self.dir})")
        return report

    def _certificates(self, st: LabState) -> str:
        """The lab's CA and each host's certificate (its name, address and loopback as SANs), made once."""
        made = []
        if not self.ca_file.exists():
            pki.init_ca(self.tls_dir, "kasou lab")
            made.append("CA")
        for h in st.hosts:
            if not (h.tls_dir / "host.key").exists() or not (h.tls_dir / "ca.crt").exists():
                pki.issue(self.tls_dir, h.name, [h.address, "127.0.0.1"], [], h.tls_dir)
                os.chmod(h.tls_dir, 0o700)
                made.append(h.name)
        if not self.etcd_tls.key.exists() or not self.etcd_tls.ca.exists():
            # etcd is not a kasou host: its certificate lacks the host marker, so agents do not answer it
            pki.issue(self.tls_dir, "etcd", [GATEWAY, "127.0.0.1"], [], self.etcd_tls.key.parent, kasou_host=False)
            os.chmod(self.etcd_tls.key.parent, 0o700)
            made.append("etcd")
        return f"tls: site CA {self.ca_file}" + (f" (made: {', '.join(made)})" if made else "")

    def _etcd_up(self, st: LabState, undo: list[Callable[[], Any]]) -> None:
        cluster = self._cluster()
        dead = [i for i, m in enumerate(st.etcd) if not is_etcd(self.etcd_dir / f"{m.name}.etcd", m.pid)]
        # start() also waits for the members that run already to be healthy
        cluster.start(timeout=ETCD_TIMEOUT, members=dead)
        for i in dead:
            pid = cluster.pids[i]
            st.etcd[i].pid = pid
            if pid is not None:
                undo.append(functools.partial(terminate, pid))
        self._save(st)

    def _env(self, st: LabState, h: LabHost) -> dict[str, str]:
        drop = ("KASOU_TOKEN", "KASOU_API", "KASOU_CA", "KASOU_TLS_CERT", "KASOU_TLS_KEY", "KASOU_TLS_DIR")
        env = {k: v for k, v in os.environ.items() if k not in drop}
        env.update(
            KASOU_HOME=str(h.home),
            KASOU_HOST_NAME=h.name,
            KASOU_IMAGES=st.images,
            KASOU_SHARED_DIR=str(self.shared_dir),
            KASOU_ETCD=",".join(m.client_url for m in st.etcd),
            KASOU_ETCD_METRICS=",".join(m.metrics_url or "" for m in st.etcd),
            KASOU_TOKEN_FILE=str(self.token_file),
            KASOU_API=h.api_url,
            KASOU_UPLINK=VM_UPLINK,
            # pools may be made in the lab's directory (LAB/pool-x), beside the caller's storage roots
            KASOU_STORAGE_ROOTS=":".join([*storage_roots(), str(self.dir)]),
        )
        return env

    def _spawn(self, st: LabState, h: LabHost, service: str) -> int:
        argv = [*net.in_netns(h.netns, Path(h.dir) / ".cgroup"), sys.executable, "-m", "kasou", *h.argv(service)]
        with open(h.log_dir / f"{service}.log", "ab") as log:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self._env(st, h),
                cwd=h.dir,
                start_new_session=True,
                close_fds=True,
            )
        return proc.pid  # nsenter, unshare and sh exec the command: this is kasou's pid

    def _wait_answering(self, st: LabState, token: str, timeout: float, only: str | None = None) -> None:
        pending = [(h, s) for h in st.hosts for s in SERVICES if only in (None, h.name)]
        deadline = time.monotonic() + timeout
        while pending:
            for h, s in list(pending):
                if probe(h, s, token) == 200:
                    pending.remove((h, s))
                elif not is_service(h, s, h.pid(s)):
                    raise LabError(f"the {s} of {h.name} exited: {log_tail(h.log_dir / f'{s}.log')}")
            if not pending:
                return
            if time.monotonic() > deadline:
                h, s = pending[0]
                raise LabError(f"the {s} of {h.name} did not answer within {timeout:.0f} s; see {h.log_dir}/{s}.log")
            time.sleep(0.25)

    def _views(self, st: LabState, token: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """The leader every host's API names (they must agree: any of them forwards a create there)
        and that leader's view of the hosts."""
        leaders = {h.name: api_get(h, "/v1/cluster", token).get("leader") for h in st.hosts}
        named = set(leaders.values())
        if None in named or len(named) != 1:
            waiting = sorted(n for n, lead in leaders.items() if lead is None)
            if waiting:
                return {"leader": None}, []
            raise LabError(f"the hosts do not agree on the control plane leader yet ({leaders})")
        leader = st.host(str(named.pop()))
        return dict(api_get(leader, "/v1/cluster", token)), list(api_get(leader, "/v1/hosts", token))

    # -- a host's power and its link

    def kill(self, name: str) -> list[int]:
        """Power loss of one host: SIGKILL its services, its QEMUs, everything in its namespace.
        The namespace stays (the host is off). Returns the pids killed."""
        with self._locked():
            st = self.require()
            h = st.host(name)
            pids = self._host_processes(st, h)
            left = kill_all(set(pids))
            h.agent_pid = h.api_pid = None
            self._save(st)
        if left:
            raise LabError(f"processes of {name} outlived SIGKILL for {GONE_TIMEOUT:.0f} s: {left}")
        return sorted(pids)

    def _host_processes(self, st: LabState, h: LabHost) -> set[int]:
        pids = set(net.pids_in_netns(h.netns))
        for s in SERVICES:
            pid = h.pid(s)
            if pid is not None and is_service(h, s, pid):
                pids.add(pid)
        paths = Paths(home=h.home, images=Path(st.images))
        pids.update(marked_processes([f"{h.home}/", f"{paths.vm_run}/"], binaries=("qemu",)))
        pids.discard(os.getpid())
        return pids

    def revive(self, name: str, timeout: float = SERVICE_TIMEOUT) -> list[str]:
        """Start a killed host's services again (its link stays as it is)."""
        preflight()
        with self._locked():
            st = self.require()
            h = st.host(name)
            if not net.netns_exists(h.netns):
                raise LabError(f"the network namespace {h.netns} is gone; repair the lab with: kasou lab up")
            token = ensure_token(self.token_file)
            report = []
            for s in SERVICES:
                if is_service(h, s, h.pid(s)):
                    report.append(f"{h.name} {s}: running (pid {h.pid(s)})")
                    continue
                h.set_pid(s, self._spawn(st, h, s))
                self._save(st)
                report.append(f"{h.name} {s}: started (pid {h.pid(s)})")
            self._wait_answering(st, token, timeout, only=h.name)
            return report

    def partition(self, name: str, heal: bool = False) -> str:
        """Cut (or restore) the host's management link: its root-side veth goes down (up). Its VM link stays."""
        with self._locked():
            st = self.require()
            h = st.host(name)
            net.set_link(h.veth, up=heal)
        return f"{h.name}: link {h.veth} {'up (healed)' if heal else 'down (partitioned)'}"

    # -- status and env

    def status(self) -> dict[str, Any]:
        st = self.require()
        token = self._token()
        hosts = []
        for h in st.hosts:
            up = net.link_up(h.veth)
            vm_up = net.link_up(h.vm_veth)
            entry: dict[str, Any] = {
                "name": h.name,
                "address": h.address,
                "netns": h.netns,
                "netns_exists": net.netns_exists(h.netns),
                "link": "missing" if up is None else ("up" if up else "down"),
                "vm_link": "missing" if vm_up is None else ("up" if vm_up else "down"),
                "home": str(h.home),
            }
            for s in SERVICES:
                alive = is_service(h, s, h.pid(s))
                entry[s] = {
                    "pid": h.pid(s),
                    "alive": alive,
                    "answers": alive and probe(h, s, token, timeout=1.0) == 200,
                    "url": h.agent_url if s == "agent" else h.api_url,
                }
            hosts.append(entry)
        members = []
        verify = self._cluster().client_tls() if self.etcd_tls.key.exists() else True
        with httpx.Client(timeout=1.0, verify=verify) as c:
            for m in st.etcd:
                alive = is_etcd(self.etcd_dir / f"{m.name}.etcd", m.pid)
                healthy = False
                if alive:
                    with contextlib.suppress(httpx.HTTPError, ValueError):
                        healthy = c.get(f"{m.client_url}/health").json().get("health") == "true"
                members.append({**asdict(m), "alive": alive, "healthy": healthy})
        return {
            "dir": str(self.dir),
            "bridge": {"name": st.bridge, "address": f"{GATEWAY}/{PREFIXLEN}", "up": net.link_up(st.bridge)},
            "vm_bridge": {"name": st.vm_bridge, "up": net.link_up(st.vm_bridge)},
            "hosts": hosts,
            "etcd": members,
            "backup_server": vault.status(st.backup_server) if st.backup_server else None,
            "directory": labdir.status(st.directory) if st.directory else None,
        }

    def env(self, name: str) -> list[str]:
        st = self.require()
        h = st.host(name)
        token = self._token()
        if token is None:
            raise LabError(f"the lab has no API token at {self.token_file}")
        return [f"export KASOU_API={h.api_url}", f"export KASOU_CA={self.ca_file}", f"export KASOU_TOKEN={token}"]

    # -- down

    def down(self) -> list[str]:
        if not self.dir.exists():
            strays = net.link_names("klab") + [n for n in net.netns_names() if n.startswith("klab-")]
            if strays:
                raise LabError(
                    f"there is no lab at {self.dir}, but {', '.join(strays)} exist (a lab of another KASOU_LAB_DIR?)"
                )
            return [f"no lab at {self.dir}"]
        with self._locked():
            st = self.load()
            if st is None:  # a directory from an up that died before recording anything
                shutil.rmtree(self.dir)
                return [f"removed {self.dir} (no lab recorded in it)"]
            return self._teardown(st)

    def _teardown(self, st: LabState) -> list[str]:
        report: list[str] = []
        errors: list[str] = []
        pids: set[int] = set()
        for h in st.hosts:
            pids |= self._host_processes(st, h)
        left = kill_all(pids)
        if left:
            errors.append(f"processes outlived SIGKILL: {left}")
        report.append(f"killed {len(pids)} host processes (services, QEMUs)")
        etcd = [m.pid for m in st.etcd if is_etcd(self.etcd_dir / f"{m.name}.etcd", m.pid)]
        for pid in etcd:  # one by one: each member then exits in milliseconds
            if pid is not None:
                terminate(pid)
        stray = set(marked_processes([f"{self.dir}/"]))
        if stray:
            left = kill_all(stray)
            if left:
                errors.append(f"processes outlived SIGKILL: {left}")
        report.append(f"stopped {len(etcd)} etcd members")
        removed, errs = vault.teardown(st.backup_server) if st.backup_server else ([], [])
        errors += errs
        if st.directory is not None:
            more, errs = labdir.teardown(st.directory)
            removed += more
            errors += errs
        for h in st.hosts:
            steps = [
                (h.veth, functools.partial(net.delete_link, h.veth)),
                (h.vm_veth, functools.partial(net.delete_link, h.vm_veth)),
                (f"netns {h.netns}", functools.partial(net.remove_netns, h.netns)),
            ]
            net.remove_each(steps, removed, errors)
        for bridge in (st.bridge, st.vm_bridge):
            try:
                if net.delete_link(bridge):
                    removed.append(bridge)
            except (OSError, KasouError) as e:
                errors.append(f"{bridge}: {e}")
        report.append("removed " + (", ".join(removed) or "no links or namespaces"))
        for h in st.hosts:
            run = Paths(home=h.home, images=Path(st.images)).vm_run
            for d in confine.remove_all(confine.host_tag(run)):  # its QEMUs' cgroups (they were killed above)
                errors.append(f"cgroup {d} is still in use")
            if not run.is_relative_to(h.home) and run.parent.parent == Path("/run/kasou"):
                shutil.rmtree(run.parent, ignore_errors=True)
        if errors:
            raise LabError(f"lab down is incomplete ({'; '.join(errors)}); the state is kept in {self.dir}")
        shutil.rmtree(self.dir, ignore_errors=True)
        report.append(f"removed {self.dir}")
        return report
