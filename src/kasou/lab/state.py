"""The lab's recorded state: its hosts (names, namespaces, addresses, service pids), its etcd members,
and the constants of its layout (see :mod:`kasou.lab.hosts` for the whole picture)."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kasou.errors import NotFound

DEFAULT_LAB_DIR = Path("/var/lib/kasou/lab")
STATE_FILE = "lab.json"
BRIDGE = "klab0"
VM_BRIDGE = "klab-vm"  # VM traffic between the hosts (their uplinks); no address
VM_UPLINK = "vmnet0"  # each host's end of its VM link, its KASOU_UPLINK
SUBNET = "10.88.0"
GATEWAY = f"{SUBNET}.1"
PREFIXLEN = 24
API_PORT = 8470
AGENT_PORT = 8471
ETCD_MEMBERS = 3
ETCD_BASE_PORT = 2379
MAX_HOSTS = 50
SERVICE_TIMEOUT = 90.0  # the first agent start of a boot probes KVM (15 s) before it listens
ETCD_TIMEOUT = 30.0
GONE_TIMEOUT = 10.0
SERVICES = ("agent", "api")
VAULT_NAME = "backup"  # kasou lab up --backup-server: netns and veth klab-backup, LAB/backup-server
VAULT_ADDRESS = f"{SUBNET}.5"  # below the hosts' 10.88.0.11..60
VAULT_PORT = 8472
DIRECTORY_NAME = "dir"  # kasou lab up --directory: netns and veth klab-dir, LAB/directory
DIRECTORY_ADDRESS = f"{SUBNET}.6"


def lab_dir() -> Path:
    return Path(os.environ.get("KASOU_LAB_DIR") or DEFAULT_LAB_DIR).absolute()


@dataclass
class LabHost:
    name: str
    index: int
    netns: str
    veth: str
    address: str
    dir: str
    agent_pid: int | None = None
    api_pid: int | None = None
    vm_veth: str = ""  # root side of the host's VM link (klabv-h{i})

    @property
    def home(self) -> Path:
        return Path(self.dir) / "home"

    @property
    def log_dir(self) -> Path:
        return Path(self.dir) / "log"

    @property
    def agent_listen(self) -> str:
        return f"{self.address}:{AGENT_PORT}"

    @property
    def api_address(self) -> str:
        return f"{self.address}:{API_PORT}"

    @property
    def agent_url(self) -> str:
        return f"https://{self.agent_listen}"

    @property
    def api_url(self) -> str:
        return f"https://{self.api_address}"

    @property
    def tls_dir(self) -> Path:
        return self.home / "tls"

    def pid(self, service: str) -> int | None:
        return self.agent_pid if service == "agent" else self.api_pid

    def set_pid(self, service: str, pid: int | None) -> None:
        if service == "agent":
            self.agent_pid = pid
        else:
            self.api_pid = pid

    def argv(self, service: str) -> list[str]:
        if service == "agent":
            return ["agent", "--listen", self.agent_listen]
        return ["serve", "--address", self.api_address]


@dataclass
class EtcdMember:
    name: str
    client_url: str
    peer_url: str
    pid: int | None = None
    metrics_url: str | None = None


@dataclass
class LabVault:
    """The lab's backup server: a namespace of its own running ``kasou backup-server serve``."""

    dir: str  # LAB/backup-server: data/ (the server's data directory), serve.log, the lab's site backup key
    netns: str = f"klab-{VAULT_NAME}"
    veth: str = f"klab-{VAULT_NAME}"
    address: str = VAULT_ADDRESS
    port: int = VAULT_PORT
    pid: int | None = None
    fingerprint: str = ""  # its certificate's SHA-256 (64 hex digits), pinned by kasou

    @property
    def data_dir(self) -> Path:
        return Path(self.dir) / "data"

    @property
    def log(self) -> Path:
        return Path(self.dir) / "serve.log"

    @property
    def key_file(self) -> Path:
        """The lab's site backup key (private part, 0600): ``kasou backup drill --key`` and restores need it."""
        return Path(self.dir) / "site-backup.key"

    @property
    def token_file(self) -> Path:
        return Path(self.dir) / "writer.token"

    @property
    def url(self) -> str:
        return f"https://{self.address}:{self.port}"

    def argv(self) -> list[str]:
        return ["backup-server", "serve", "--dir", str(self.data_dir), "--listen", f"{self.address}:{self.port}"]


@dataclass
class LabDirectory:
    """The lab's directory: a Samba AD domain controller in a namespace of its own (:mod:`kasou.lab.directory`)."""

    dir: str  # LAB/directory: dc/ (the domain), tls/, passwords.json, samba.out
    netns: str = f"klab-{DIRECTORY_NAME}"
    veth: str = f"klab-{DIRECTORY_NAME}"
    address: str = DIRECTORY_ADDRESS
    pid: int | None = None

    @property
    def conf(self) -> Path:
        return Path(self.dir) / "dc" / "etc" / "smb.conf"

    @property
    def log(self) -> Path:
        return Path(self.dir) / "samba.out"

    @property
    def passwords_file(self) -> Path:
        return Path(self.dir) / "passwords.json"

    @property
    def url(self) -> str:
        return f"ldaps://{self.address}"


@dataclass
class LabState:
    dir: str
    images: str
    hosts: list[LabHost]
    etcd: list[EtcdMember]
    bridge: str = BRIDGE
    created: float = field(default_factory=time.time)
    vm_bridge: str = VM_BRIDGE
    backup_server: LabVault | None = None
    directory: LabDirectory | None = None

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LabState:
        hosts = [LabHost(**{"vm_veth": f"klabv-{h['name']}", **h}) for h in d["hosts"]]
        return cls(
            dir=d["dir"], images=d["images"], bridge=d.get("bridge", BRIDGE), created=d.get("created", 0.0),
            hosts=hosts, etcd=[EtcdMember(**m) for m in d["etcd"]], vm_bridge=d.get("vm_bridge", VM_BRIDGE),
            backup_server=LabVault(**d["backup_server"]) if d.get("backup_server") else None,
            directory=LabDirectory(**d["directory"]) if d.get("directory") else None,
        )  # fmt: skip

    def host(self, name: str) -> LabHost:
        for h in self.hosts:
            if h.name == name:
                return h
        names = ", ".join(h.name for h in self.hosts)
        raise NotFound(f"the lab has no host {name!r} (its hosts: {names})")
