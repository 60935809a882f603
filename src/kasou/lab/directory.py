"""The lab's directory (``kasou lab up --directory``): a Samba Active Directory domain controller in a namespace
beside the hosts, test users and groups in it, and the lab's kasou set to sign them in.

Layout (``LAB`` is the lab's directory, see :mod:`kasou.lab.hosts`)::

    netns klab-dir             eth0 10.88.0.6/24 (a port of klab0, as a host's), default route via 10.88.0.1
      samba --foreground --no-process-group -M single -s LAB/directory/dc/etc/smb.conf (LDAPS on :636 only)
    LAB/directory/dc/          the domain (samba-tool domain provision --targetdir), KASOU.LAB
    LAB/directory/tls/         the DC's certificate, issued by the lab's site CA (the CA kasou is given)
    LAB/directory/passwords.json   the test users' and kasou's service account's passwords (0600)

Users (password in ``passwords.json``): ``dir-admin`` (group kasou-admins → admin), ``dir-ops`` (kasou-operators
→ operator), ``dir-vendor`` (lab-staff, a member of kasou-vendors-lab → vendor of department lab), ``dir-manager``
(lab-managers → manager of department lab: approves the lab vendor's maintenance windows), ``dir-nurse``
(ward-a-nurses → clinician, pool ward-a), ``dir-off`` (disabled). :func:`provision` and :func:`spawn` are also
how the tests start their Samba DC (``tests/ldapservers.py``).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import textwrap
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import httpx

from kasou import pki
from kasou.hypervisor.qemu import process
from kasou.lab import net
from kasou.lab.net import LabError
from kasou.lab.procs import kill_all, log_tail
from kasou.lab.state import GATEWAY, PREFIXLEN, LabDirectory

REALM = "KASOU.LAB"
WORKGROUP = "KASOULAB"
BASE_DN = "DC=kasou,DC=lab"
SERVICE = "kasou-svc"
LAB_PEOPLE = {"dir-admin": ["kasou-admins"], "dir-ops": ["kasou-operators"], "dir-vendor": ["lab-staff"],
              "dir-manager": ["lab-managers"], "dir-nurse": ["ward-a-nurses"],
              "dir-off": ["kasou-operators"]}  # fmt: skip
LAB_NESTED = {"kasou-vendors-lab": ["lab-staff"]}
LAB_DISABLED = ("dir-off",)
LAB_MAPPINGS = {"kasou-admins": {"role": "admin"}, "kasou-operators": {"role": "operator"},
                "kasou-vendors-lab": {"role": "vendor", "departments": ["lab"]},
                "lab-managers": {"role": "manager", "departments": ["lab"]},
                "ward-a-nurses": {"role": "clinician", "pools": ["ward-a"]}}  # fmt: skip
PROVISION_TIMEOUT = 180.0

POPULATE = textwrap.dedent("""
    import json, sys
    from samba.auth import system_session
    from samba.param import LoadParm
    from samba.samdb import SamDB
    conf, spec = sys.argv[1], json.loads(sys.stdin.read())
    lp = LoadParm(); lp.load(conf)
    db = SamDB(url=lp.private_path("sam.ldb"), session_info=system_session(), lp=lp)
    people, nested = spec["people"], spec["nested"]
    groups = {g for gs in people.values() for g in gs} | set(nested) | {m for ms in nested.values() for m in ms}
    for g in sorted(groups):
        db.newgroup(g)
    db.newuser(spec["service"], spec["service_password"])
    for u in people:
        db.newuser(u, spec["password"], givenname=u.capitalize(), surname="Test")
    for u, gs in people.items():
        for g in gs:
            db.add_remove_group_members(g, [u], add_members_operation=True)
    for g, ms in nested.items():
        if ms:
            db.add_remove_group_members(g, ms, add_members_operation=True)
    for u in spec["disabled"]:
        db.disable_account("(sAMAccountName=%s)" % u)
    for u in spec["must_change"]:
        db.force_password_change_at_next_login("(sAMAccountName=%s)" % u)
""")


def provision(
    target: Path, addresses: list[str], cert: Path, key: Path, people: dict[str, list[str]],
    nested: dict[str, list[str]], password: str, service_password: str, realm: str = REALM,
    workgroup: str = WORKGROUP, disabled: tuple[str, ...] = (), must_change: tuple[str, ...] = (),
) -> Path:  # fmt: skip
    """A new AD domain in ``target`` (``samba-tool domain provision``, its own smb.conf, LDAP only, listening on
    ``addresses``, TLS with ``cert``/``key``), with the service account ``kasou-svc``, ``people`` (all with
    ``password``) in their groups and ``nested`` groups. The smb.conf's path."""
    run = target / "run"
    run.mkdir(parents=True, exist_ok=True)
    opts = {"server services": "ldap", "interfaces": " ".join(addresses), "bind interfaces only": "yes",
            "tls enabled": "yes", "tls keyfile": str(key), "tls certfile": str(cert), "tls cafile": "",
            "pid directory": str(run), "log file": str(target / "samba.log"), "ncalrpc dir": str(run),
            "winbindd socket directory": str(run), "dns forwarder": "127.0.0.1"}  # fmt: skip
    cmd = ["samba-tool", "domain", "provision", "--use-rfc2307", "--server-role=dc", "--dns-backend=SAMBA_INTERNAL",
           f"--realm={realm}", f"--domain={workgroup}", f"--adminpass={secrets.token_urlsafe(12)}A1!",
           "--host-name=dc1", f"--host-ip={addresses[0]}", f"--targetdir={target / 'dc'}"]  # fmt: skip
    cmd += [f"--option={k} = {v}" for k, v in opts.items()]
    _run(cmd, "samba-tool domain provision", None)
    conf = target / "dc" / "etc" / "smb.conf"
    spec = {"people": people, "nested": nested, "password": password, "service": SERVICE,
            "service_password": service_password, "disabled": list(disabled),
            "must_change": list(must_change)}  # fmt: skip
    _run(["/usr/bin/python3", "-c", POPULATE, str(conf)], "adding the users and groups", json.dumps(spec))
    return conf


def _run(cmd: list[str], what: str, stdin: str | None) -> None:
    try:
        subprocess.run(cmd, check=True, capture_output=True, text=True, input=stdin, timeout=PROVISION_TIMEOUT)
    except FileNotFoundError:
        raise LabError(f"{cmd[0]} is missing (apt-get install samba samba-ad-dc samba-ad-provision)") from None
    except subprocess.CalledProcessError as e:
        tail = " ".join((e.stderr or e.stdout or "").strip().splitlines()[-3:])
        raise LabError(f"{what} failed: {tail[-500:]}") from None
    except subprocess.TimeoutExpired:
        raise LabError(f"{what} took more than {PROVISION_TIMEOUT:.0f} s") from None


def argv(conf: Path) -> list[str]:
    return ["samba", "--foreground", "--no-process-group", "-M", "single", "-s", str(conf)]


def spawn(netns: str, conf: Path, log: Path) -> subprocess.Popen[bytes]:
    """Samba in namespace ``netns`` (single process: its pid is the whole server)."""
    with log.open("ab") as out:
        return subprocess.Popen(["ip", "netns", "exec", netns, *argv(conf)], stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True, close_fds=True)  # fmt: skip


def listening(address: str, port: int = 636, timeout: float = 1.0) -> bool:
    try:
        with socket.create_connection((address, port), timeout=timeout):
            return True
    except OSError:
        return False


# -- the lab's DC ------------------------------------------------------------------------------------


def plan(lab_dir: Path) -> LabDirectory:
    return LabDirectory(dir=str(lab_dir / "directory"))


def is_serving(d: LabDirectory, pid: int | None) -> bool:
    if pid is None or not process.alive(pid):
        return False
    # Samba names itself "samba: root process" (its command line is gone): a samba in the lab DC's namespace.
    return "samba" in " ".join(process.cmdline(pid)) and pid in net.pids_in_netns(d.netns)


def passwords(d: LabDirectory) -> dict[str, str]:
    return dict(json.loads(d.passwords_file.read_text()))


def ensure(d: LabDirectory, bridge: str, ca_dir: Path, undo: list[Callable[[], Any]], timeout: float) -> str:
    """Its namespace and link, its domain (provisioned once), its process; waits until LDAPS answers."""
    if shutil.which("samba-tool") is None:
        raise LabError(
            "samba-tool is missing: apt-get install samba samba-ad-dc samba-ad-provision (or run scripts/install.sh)"
        )
    if net.ensure_netns(d.netns):
        undo.append(partial(net.remove_netns, d.netns))
    if net.ensure_host_link(d.veth, d.netns, bridge, d.address, PREFIXLEN, GATEWAY):
        undo.append(partial(net.delete_link, d.veth))
    made = ""
    if not d.conf.exists():
        t0 = time.monotonic()
        undo.append(partial(shutil.rmtree, d.dir, True))
        Path(d.dir).mkdir(mode=0o700, parents=True, exist_ok=True)
        tls = Path(d.dir) / "tls"
        cert, key = pki.issue(ca_dir, "dc1.kasou.lab", [d.address], [], tls, kasou_host=False)
        pw = {"users": secrets.token_urlsafe(12) + "-Aa1", "service": secrets.token_urlsafe(12) + "-Aa1"}
        fd = os.open(d.passwords_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(pw, f)
        provision(Path(d.dir), [d.address], cert, key, LAB_PEOPLE, LAB_NESTED, pw["users"], pw["service"],
                  disabled=LAB_DISABLED)  # fmt: skip
        made = f" (domain {REALM} provisioned in {time.monotonic() - t0:.1f} s)"
    state = "running"
    if not is_serving(d, d.pid):
        d.pid = spawn(d.netns, d.conf, d.log).pid
        undo.append(partial(kill_all, {d.pid}))
        state = "started"
    deadline = time.monotonic() + timeout
    while not listening(d.address):
        if not process.alive(d.pid):  # (is_serving may miss it for a moment: ip netns exec is not samba yet)
            raise LabError(f"samba exited: {log_tail(Path(d.dir) / 'samba.log')}")
        if time.monotonic() > deadline:
            raise LabError(f"samba did not answer on {d.url} within {timeout:.0f} s; see {d.log}")
        time.sleep(0.3)
    return f"directory {d.address} (netns {d.netns}): samba {state} pid {d.pid}, {d.url}{made}"


def configure(d: LabDirectory, api_url: str, ca_file: Path, token: str) -> str:
    """``kasou directory set`` (the lab's CA) and the group mappings, through the lab's API."""
    pw = passwords(d)
    body = {"urls": [d.url], "base_dn": BASE_DN, "bind_user": f"CN={SERVICE},CN=Users,{BASE_DN}",
            "bind_password": pw["service"], "ca_pem": ca_file.read_text()}  # fmt: skip
    try:
        with httpx.Client(base_url=api_url, verify=str(ca_file), headers={"Authorization": f"Bearer {token}"},
                          timeout=60) as c:  # fmt: skip
            r = c.put("/v1/directory", json=body)
            if r.status_code == 200:
                for group, m in LAB_MAPPINGS.items():
                    r = c.put(f"/v1/directory/mappings/{group}", json=m)
                    if r.status_code != 200:
                        break
    except (httpx.HTTPError, OSError) as e:
        raise LabError(f"cannot set kasou's directory through {api_url}: {e}") from e
    if r.status_code != 200:
        raise LabError(f"kasou refused the lab's directory ({r.status_code}): {r.text[:300]}")
    users = ", ".join(LAB_PEOPLE)
    return f"directory sign-in: {d.url}; users {users} (passwords in {d.passwords_file})"


def teardown(d: LabDirectory) -> tuple[list[str], list[str]]:
    removed: list[str] = []
    errors: list[str] = []
    pids = set(net.pids_in_netns(d.netns))
    if is_serving(d, d.pid) and d.pid is not None:
        pids.add(d.pid)
    pids.discard(os.getpid())
    left = kill_all(pids)
    if left:
        errors.append(f"directory processes outlived SIGKILL: {left}")
    elif pids:
        removed.append(f"samba (pid {', '.join(map(str, sorted(pids)))})")
    steps = ((d.veth, partial(net.delete_link, d.veth)), (f"netns {d.netns}", partial(net.remove_netns, d.netns)))
    net.remove_each(steps, removed, errors)
    return removed, errors


def status(d: LabDirectory) -> dict[str, Any]:
    up = net.link_up(d.veth)
    alive = is_serving(d, d.pid)
    return {"address": d.address, "url": d.url, "netns": d.netns, "netns_exists": net.netns_exists(d.netns),
            "link": "missing" if up is None else ("up" if up else "down"), "pid": d.pid, "alive": alive,
            "answers": alive and listening(d.address), "realm": REALM, "users": list(LAB_PEOPLE)}  # fmt: skip
