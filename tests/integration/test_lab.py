"""``kasou lab``: 3 hosts in network namespaces, a 3-member etcd, the real services, real partitions,
and a backup server in a namespace of its own (``--backup-server``) that the lab's kasou copies backups to.

The lab starts once for the module (its own KASOU_LAB_DIR under /tmp) and the last tests take it
down. The fixture's teardown removes whatever a failed test left: it runs ``lab down``, then
SIGKILLs any pid the lab recorded and deletes any ``klab*`` namespace or link.
No VM is booted; the services start for real (needs root, iproute2 and etcd-server).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from kasou.vault import immutable
from kasou.vault.sync import Primary

pytestmark = [pytest.mark.qemu, pytest.mark.timeout(600)]

LAB = [sys.executable, "-c", "from kasou.cli.lab import main; main()"]
HOSTS = ("h1", "h2", "h3")
ADDRESS = {"h1": "10.88.0.11", "h2": "10.88.0.12", "h3": "10.88.0.13"}
AGENT_PORT = 8471
API_PORT = 8470


def pid_alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def netns_list() -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=10).stdout
    return [ln.split()[0] for ln in out.splitlines() if ln.strip()]


def klab_links() -> list[str]:
    out = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True, timeout=10).stdout
    names = [ln.split(":")[1].strip().split("@")[0] for ln in out.splitlines() if ":" in ln]
    return [n for n in names if n.startswith("klab")]


def pids_in_netns(name: str) -> list[int]:
    r = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True, timeout=10)
    return [int(p) for p in r.stdout.split() if p.isdigit() and pid_alive(int(p))]


def lab_processes(lab_dir: Path) -> list[int]:
    """Live processes that belong to a lab: etcd or QEMU naming its directory, kasou services on its net."""
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        try:
            args = (d / "cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        mine = any(str(lab_dir) in a for a in args) or ("kasou" in args and any("10.88.0." in a for a in args))
        if mine and pid_alive(int(d.name)):
            out.append(int(d.name))
    return out


def reachable(address: str, port: int, timeout: float = 0.5) -> bool:
    """A TCP connect from the root namespace."""
    try:
        with socket.create_connection((address, port), timeout=timeout):
            return True
    except OSError:
        return False


PROBE = """
import socket, sys
try:
    socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=float(sys.argv[3])).close()
    print("open")
except OSError as e:
    print("closed", e)
"""


def reachable_from(netns: str, address: str, port: int, timeout: float = 0.5) -> bool:
    """A TCP connect made inside a host's network namespace."""
    r = subprocess.run(
        ["ip", "netns", "exec", netns, sys.executable, "-S", "-c", PROBE, address, str(port), str(timeout)],
        capture_output=True, text=True, timeout=15,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    return r.stdout.startswith("open")


def wait_until(what: str, cond: Any, timeout: float, every: float = 0.05) -> float:
    """Seconds until ``cond()`` held; fails after ``timeout``."""
    t0 = time.monotonic()
    while not cond():
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"not {what} within {timeout} s")
        time.sleep(every)
    return time.monotonic() - t0


@dataclass
class Lab:
    dir: Path
    env: dict[str, str]
    up_seconds: float
    up_output: str

    def run(self, *args: str, check: bool = True, timeout: float = 180) -> subprocess.CompletedProcess[str]:
        r = subprocess.run([*LAB, *args], env=self.env, capture_output=True, text=True, timeout=timeout)
        if check and r.returncode != 0:
            raise AssertionError(f"kasou lab {' '.join(args)} failed ({r.returncode}): {r.stderr.strip()}")
        return r

    def status(self) -> dict[str, Any]:
        return dict(json.loads(self.run("status", "--json").stdout))

    def host(self, name: str) -> dict[str, Any]:
        return next(h for h in self.status()["hosts"] if h["name"] == name)

    @property
    def token(self) -> str:
        return (self.dir / "api.token").read_text().strip()

    def state(self) -> dict[str, Any] | None:
        try:
            return dict(json.loads((self.dir / "lab.json").read_text()))
        except FileNotFoundError:
            return None


def _recorded_pids(state: dict[str, Any] | None) -> list[int]:
    if not state:
        return []
    pids = [h[k] for h in state["hosts"] for k in ("agent_pid", "api_pid")]
    pids += [m["pid"] for m in state["etcd"]]
    pids += [state["backup_server"]["pid"]] if state.get("backup_server") else []
    return [p for p in pids if p]


def _scrub(state: dict[str, Any] | None) -> None:
    """Last resort after a failed test: remove what ``lab down`` did not."""
    for pid in _recorded_pids(state):
        if pid_alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    for ns in netns_list():
        if ns.startswith("klab-"):
            for pid in pids_in_netns(ns):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=10)
    for link in klab_links():
        subprocess.run(["ip", "link", "del", link], capture_output=True, timeout=10)


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    if os.geteuid() != 0:
        pytest.skip("the lab needs root")
    for tool in ("ip", "etcd"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed")
    # a lab an earlier run left here was taken down before this module (tests/integration/conftest.py)
    assert not klab_links() and not any(n.startswith("klab-") for n in netns_list())
    base = Path(tempfile.mkdtemp(prefix="kasou-lab-t-", dir="/tmp"))
    env = dict(os.environ, KASOU_LAB_DIR=str(base / "lab"))
    env.pop("KASOU_TOKEN", None)
    env.pop("KASOU_API", None)
    t0 = time.monotonic()
    r = subprocess.run([*LAB, "up", "--hosts", "3", "--backup-server"], env=env, capture_output=True, text=True,
                       timeout=300)  # fmt: skip
    lab = Lab(base / "lab", env, time.monotonic() - t0, r.stdout)
    state = lab.state()
    try:
        assert r.returncode == 0, r.stderr
        yield lab
    finally:
        state = lab.state() or state
        subprocess.run([*LAB, "down"], env=env, capture_output=True, timeout=120)
        _scrub(state)
        immutable.release_tree(base)  # the backup server's generations, should lab down have failed
        shutil.rmtree(base, ignore_errors=True)


def test_up_returns_when_the_cluster_accepts_work(lab: Lab) -> None:
    """The first test after up: every host's API names the same leader, which counts all three agents up
    with room (a `vm create --start` once failed right after up: "no host agent answers; is kasou up?")."""
    ca = ssl.create_default_context(cafile=str(lab.dir / "tls" / "ca.crt"))
    headers = {"Authorization": f"Bearer {lab.token}"}
    with httpx.Client(timeout=5, verify=ca, headers=headers) as c:
        leaders = {h: c.get(f"https://{ADDRESS[h]}:{API_PORT}/v1/cluster").json()["leader"] for h in HOSTS}
        assert len(set(leaders.values())) == 1 and None not in leaders.values(), leaders
        leader = leaders["h1"]
        hosts = c.get(f"https://{ADDRESS[leader]}:{API_PORT}/v1/hosts").json()
    assert sorted(h["name"] for h in hosts if h["state"] == "up" and h["memory_free_mib"] >= 128) == list(HOSTS)
    assert "cluster: leader elected, 3 agents registered" in lab.up_output, lab.up_output


def test_up_makes_three_hosts_whose_services_answer_from_the_root_namespace(lab: Lab) -> None:
    print(f"lab up --hosts 3: {lab.up_seconds:.1f} s\n{lab.up_output}")
    hosts_links = {*(f"klab-{h}" for h in HOSTS), *(f"klabv-{h}" for h in HOSTS)}
    assert set(klab_links()) == {"klab0", "klab-vm", "klab-backup", *hosts_links}
    assert {"klab-backup", *(f"klab-{h}" for h in HOSTS)} <= set(netns_list())
    ca = str(lab.dir / "tls" / "ca.crt")
    for h in HOSTS:
        tls = lab.dir / h / "home" / "tls"
        as_host = ssl.create_default_context(cafile=ca)
        as_host.load_cert_chain(tls / "host.crt", tls / "host.key")
        with httpx.Client(timeout=3, verify=as_host) as c:  # the agent wants a host's certificate (mutual TLS)
            r = c.get(f"https://{ADDRESS[h]}:{AGENT_PORT}/agent/v1/ping")
            assert r.status_code == 200, (h, r.text)
            assert r.json().get("host") == h
        with httpx.Client(timeout=3, verify=ssl.create_default_context(cafile=ca)) as c:
            with pytest.raises(httpx.TransportError):  # no client certificate: refused in the handshake
                c.get(f"https://{ADDRESS[h]}:{AGENT_PORT}/agent/v1/ping")
            api = f"https://{ADDRESS[h]}:{API_PORT}"
            assert c.get(f"{api}/v1/version", headers={"Authorization": f"Bearer {lab.token}"}).status_code == 200
            assert c.get(f"{api}/v1/version").status_code == 401
        with httpx.Client(timeout=3) as c, pytest.raises(httpx.TransportError):  # plain HTTP is not served
            c.get(f"http://{ADDRESS[h]}:{API_PORT}/v1/version")
    assert oct((lab.dir / "tls" / "ca.key").stat().st_mode & 0o777) == "0o600"
    st = lab.status()
    for h in st["hosts"]:
        assert h["netns_exists"] and h["link"] == "up" and h["vm_link"] == "up", h
        assert h["agent"]["alive"] and h["agent"]["answers"], h
        assert h["api"]["alive"] and h["api"]["answers"], h
    assert [m["healthy"] for m in st["etcd"]] == [True, True, True]
    assert [m["client_url"] for m in st["etcd"]] == [f"https://10.88.0.1:{p}" for p in (2379, 2381, 2383)]
    # etcd is mutual TLS too: the lab's CA, and a client certificate of it
    etcd = st["etcd"][0]["client_url"]
    tls = lab.dir / "h1" / "home" / "tls"
    as_h1 = ssl.create_default_context(cafile=ca)
    as_h1.load_cert_chain(tls / "host.crt", tls / "host.key")
    with httpx.Client(timeout=3, verify=as_h1) as c:
        assert c.get(f"{etcd}/health").json()["health"] == "true"
    anonymous = ssl.create_default_context(cafile=ca)
    with httpx.Client(timeout=3, verify=anonymous) as c, pytest.raises(httpx.TransportError):
        c.get(f"{etcd}/health")  # no client certificate
    with httpx.Client(timeout=3) as c, pytest.raises(httpx.TransportError):
        c.get(etcd.replace("https://", "http://") + "/health")  # no plain HTTP
    assert oct((lab.dir / "api.token").stat().st_mode & 0o777) == "0o600"
    assert (lab.dir / "shared").is_dir()
    for h in HOSTS:
        assert (lab.dir / h / "log" / "agent.log").exists() and (lab.dir / h / "home").is_dir()


def test_the_backup_server_runs_in_its_own_namespace_and_kasou_is_set_to_it(lab: Lab) -> None:
    b = lab.status()["backup_server"]
    assert b["alive"] and b["answers"] and b["link"] == "up" and b["netns_exists"], b
    assert b["url"] == "https://10.88.0.5:8472" and pid_alive(b["pid"])
    assert f"backup server 10.88.0.5 (netns klab-backup): started pid {b['pid']}" in lab.up_output
    line = lab.run("status").stdout.splitlines()[-1]
    assert line.startswith("backup server 10.88.0.5") and "answers" in line, line
    assert b["pid"] not in pids_in_netns("klab-h1")
    # kasou is set to it (what `kasou backup server set` does): any host's API says so
    exports = lab.run("env", "h2").stdout.splitlines()
    env = dict(lab.env, **dict(ln.removeprefix("export ").split("=", 1) for ln in exports))
    shown = subprocess.run([sys.executable, "-m", "kasou", "backup", "server", "show", "--json"], env=env,
                           capture_output=True, text=True, timeout=60)  # fmt: skip
    assert shown.returncode == 0, shown.stderr
    v = json.loads(shown.stdout)
    assert v["url"] == b["url"] and v["fingerprint"] and not v["isolated"]
    # it answers the writer token it gave the lab's kasou, with the certificate kasou pinned
    token = (lab.dir / "backup-server" / "writer.token").read_text().strip()
    assert Primary(b["url"], token, v["fingerprint"], timeout=10).info()["server_id"] == v["server_id"]
    assert oct((lab.dir / "backup-server" / "site-backup.key").stat().st_mode & 0o777) == "0o600"


def test_up_again_is_a_no_op_and_a_different_size_is_refused(lab: Lab) -> None:
    before = {h["name"]: (h["agent"]["pid"], h["api"]["pid"]) for h in lab.status()["hosts"]}
    backup_pid = lab.status()["backup_server"]["pid"]
    out = lab.run("up", "--hosts", "3").stdout
    assert "started" not in out, out
    assert "(set already)" in out, out  # the lab keeps its backup server without --backup-server
    assert {h["name"]: (h["agent"]["pid"], h["api"]["pid"]) for h in lab.status()["hosts"]} == before
    assert lab.status()["backup_server"]["pid"] == backup_pid
    r = lab.run("up", "--hosts", "2", check=False)
    assert r.returncode == 1
    assert r.stderr.startswith("error: ") and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_hosts_reach_each_other_and_etcd_over_their_links(lab: Lab) -> None:
    assert reachable_from("klab-h1", ADDRESS["h2"], AGENT_PORT)
    assert reachable_from("klab-h2", ADDRESS["h3"], API_PORT)
    assert reachable_from("klab-h3", ADDRESS["h1"], AGENT_PORT)
    assert reachable_from("klab-h3", "10.88.0.1", 2379)  # etcd on the bridge
    # a host's own services are not on the root namespace's loopback
    assert not reachable_from("klab-h1", "127.0.0.1", 2379)


def test_partition_cuts_the_host_off_within_2_s_and_heal_restores_it(lab: Lab) -> None:
    lab.run("partition", "h2")
    try:
        cut_root = wait_until("h2 unreachable from root", lambda: not reachable(ADDRESS["h2"], AGENT_PORT), 2)
        assert cut_root < 2
        assert not reachable_from("klab-h1", ADDRESS["h2"], AGENT_PORT)
        assert not reachable_from("klab-h2", "10.88.0.1", 2379)  # h2 lost etcd too
        assert reachable(ADDRESS["h3"], AGENT_PORT)  # the others are not affected
        assert reachable_from("klab-h1", ADDRESS["h3"], AGENT_PORT)
        h2 = lab.host("h2")
        assert h2["link"] == "down"
        assert h2["agent"]["answers"], "a partitioned host still runs (status asks from inside)"
    finally:
        lab.run("partition", "h2", "--heal")
    healed = wait_until("h2 reachable from root", lambda: reachable(ADDRESS["h2"], AGENT_PORT), 2)
    assert healed < 2
    wait_until("h2 reachable from h1", lambda: reachable_from("klab-h1", ADDRESS["h2"], AGENT_PORT), 2)
    assert lab.host("h2")["link"] == "up"


def test_kill_is_a_power_loss_and_revive_starts_the_host_again(lab: Lab) -> None:
    h3 = lab.host("h3")
    pids = {h3["agent"]["pid"], h3["api"]["pid"], *pids_in_netns("klab-h3")}
    assert len(pids) >= 2
    out = lab.run("kill", "h3").stdout
    assert out.startswith("h3: killed"), out
    assert not [p for p in pids if pid_alive(p)]
    assert "klab-h3" in netns_list()  # the host is off, not gone
    assert pids_in_netns("klab-h3") == []
    assert not reachable(ADDRESS["h3"], AGENT_PORT)
    st = lab.host("h3")
    assert not st["agent"]["alive"] and not st["api"]["alive"] and st["link"] == "up"
    assert reachable(ADDRESS["h1"], AGENT_PORT) and reachable(ADDRESS["h2"], API_PORT)

    lab.run("revive", "h3")
    st = lab.host("h3")
    assert st["agent"]["answers"] and st["api"]["answers"]
    assert st["agent"]["pid"] not in pids


def test_env_prints_exports_that_drive_a_hosts_api(lab: Lab) -> None:
    lines = lab.run("env", "h2").stdout.splitlines()
    env = dict(ln.removeprefix("export ").split("=", 1) for ln in lines)
    assert env["KASOU_API"] == f"https://{ADDRESS['h2']}:{API_PORT}"
    auth = {"Authorization": f"Bearer {env['KASOU_TOKEN']}"}
    r = httpx.get(
        env["KASOU_API"] + "/v1/version", headers=auth, verify=ssl.create_default_context(cafile=env["KASOU_CA"])
    )
    assert r.status_code == 200
    bad = lab.run("env", "h9", check=False)
    assert bad.returncode == 3 and "no host 'h9'" in bad.stderr  # not found


def test_down_leaves_nothing_behind(lab: Lab) -> None:
    state = lab.state()
    pids = _recorded_pids(state)
    assert len(pids) == 3 * 2 + 3 + 1  # agents and APIs, etcd members, the backup server
    t0 = time.monotonic()
    out = lab.run("down").stdout
    print(f"lab down: {time.monotonic() - t0:.1f} s\n{out}")
    assert [n for n in netns_list() if n.startswith("klab-")] == []
    assert klab_links() == []
    assert [p for p in pids if pid_alive(p)] == []
    assert lab_processes(lab.dir) == []
    assert not lab.dir.exists()
    assert lab.run("down").stdout.startswith("no lab at")  # idempotent


def test_a_failed_up_removes_what_it_made(lab: Lab) -> None:
    # After the lab is down: services that cannot answer within 0.5 s make up fail half-way (its backup server too).
    r = lab.run("up", "--hosts", "2", "--backup-server", "--timeout", "0.5", check=False)
    assert r.returncode == 1
    assert r.stderr.startswith("error: lab up failed:") and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "removed what it had made" in r.stderr
    assert lab_processes(lab.dir) == []
    assert [n for n in netns_list() if n.startswith("klab-")] == []
    assert klab_links() == []
    assert not lab.dir.exists()
