"""How hosts join a cluster: the join token, the ports, and what ``POST /v1/cluster/join`` takes and answers.

A join token is ``K1.<id>.<secret>.<ca>``: ``id`` names its record in the store (where only the SHA-256 of the
secret is kept), ``secret`` proves the holder may join, ``ca`` is the SHA-256 of the site CA's certificate
(DER, hex), as kubeadm's ``--discovery-token-ca-cert-hash``: the joining host fetches the CA from the URL
it was given and refuses to go on (and to send the secret) unless the CA's fingerprint is this one, then
talks to that URL trusting that CA alone. A man in the middle cannot pass for the site without its CA's key.
"""

from __future__ import annotations

import ipaddress
import re

from pydantic import BaseModel, ConfigDict, Field, StrictBool

from kasou.errors import InvalidSpec

API_PORT = 8470
AGENT_PORT = 8471
ETCD_CLIENT_PORT = 2379
ETCD_PEER_PORT = 2380
ETCD_METRICS_PORT = 2381
TOKEN_TTL_S = 3600  # a join token's default life (one hour); at most a day
TOKEN_TTL_MAX_S = 86400
MIN_TOKEN_TTL_S = 60

#: ``cluster/removed/<host>``: a host taken out of the cluster for good while it was down (``kasou cluster remove``):
#: the control plane ignores a record the old machine may still publish under that name, until a host of that name
#: joins again (with a join token, which clears it).
REMOVED_PREFIX = "cluster/removed/"
#: Revocation (:mod:`kasou.control.revocation`): the serials of the certificates signed for each joined host, the
#: revoked serials (one key each, hex), and the site's signed revocation list.
CERTS_PREFIX = "cluster/certs/"
REVOKED_PREFIX = "cluster/revoked/"
CRL_KEY = "cluster/crl"


def revoked_serial(key: str) -> int:
    """The serial number a ``cluster/revoked/<serial>`` key names."""
    return int(key.removeprefix(REVOKED_PREFIX), 16)


_TOKEN = re.compile(r"^K1\.([0-9a-f]{8})\.([A-Za-z0-9_-]{32})\.([0-9a-f]{64})$")


class JoinToken(BaseModel):
    model_config = ConfigDict(frozen=True)

    id: str
    secret: str = Field(repr=False)
    ca_sha256: str

    def __str__(self) -> str:
        return f"K1.{self.id}.{self.secret}.{self.ca_sha256}"

    @classmethod
    def parse(cls, text: str) -> JoinToken:
        m = _TOKEN.match(text.strip())
        if m is None:
            raise InvalidSpec(
                "this is not a kasou join token (K1.<id>.<secret>.<CA fingerprint>, printed by "
                "kasou cluster init or kasou cluster token)",
                field="token",
            )
        return cls(id=m.group(1), secret=m.group(2), ca_sha256=m.group(3))


def check_address(address: str) -> str:
    """An IP address a host is reached at (not a loopback or unspecified one: other hosts must reach it)."""
    try:
        ip = ipaddress.ip_address(address.strip())
    except ValueError:
        raise InvalidSpec(f"{address!r} is not an IP address", field="address") from None
    if ip.is_loopback or ip.is_unspecified or ip.is_multicast:
        raise InvalidSpec(f"{address} cannot be a host's address in a cluster: other hosts must reach it",
                          field="address")  # fmt: skip
    return str(ip)


def url(address: str, port: int) -> str:
    host = f"[{address}]" if ":" in address else address
    return f"https://{host}:{port}"


def metrics_url(client_url: str) -> str:
    """A member's metrics listener: kasou starts every member with it on the client URL's host, port 2381."""
    host = client_url.split("://", 1)[-1].rsplit(":", 1)[0]
    return f"https://{host}:{ETCD_METRICS_PORT}"


class Member(BaseModel):
    """An etcd member as a joining host needs it (names from etcd; the new one is added without a name yet)."""

    name: str
    peer_url: str
    client_url: str | None = None


class JoinRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    token: str = Field(repr=False)
    name: str  # the joining host's name (KASOU_HOST_NAME)
    address: str  # the address other hosts reach it at
    host_csr: str  # PEM: the host's certificate signing request (its key stays on it)
    etcd_csr: str  # PEM: its etcd member's


class JoinAnswer(BaseModel):
    ca: str  # PEM: the site CA
    host_cert: str  # PEM, for host_csr's key: the joining host's certificate (kasou host marker)
    etcd_cert: str  # PEM, for etcd_csr's key: its etcd member's certificate (no host marker)
    members: list[Member]  # every member after the new one was added (the new one included)
    site_files: dict[str, str] = Field(repr=False)  # api.token, secrets.key, ...: the same on every host
    crl: str | None = None  # PEM: the site's revocation list, which the new member's etcd reads


class TokenRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    ttl_s: int = Field(TOKEN_TTL_S, ge=MIN_TOKEN_TTL_S, le=TOKEN_TTL_MAX_S)


class TokenAnswer(BaseModel):
    token: str
    expires: float  # UNIX time


class LeaveRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    host: str


class RemoveRequest(BaseModel):
    """``POST /v1/cluster/remove``: take a host that is down for good out of the cluster, from another host.
    ``drop_vms``: the VMs recorded on it are lost with it: a replicated one moves, stopped, to its replica's host,
    the others' records are dropped (:mod:`kasou.control.hostremoval`); without it, VMs there refuse the removal."""

    model_config = ConfigDict(extra="forbid")

    host: str
    drop_vms: StrictBool = False


class LostVM(BaseModel):
    """A VM of a removed host (``drop_vms``)."""

    vm: str
    moved_to: str | None = None  # the replica's host, where it is now (stopped); None: its record was dropped
    replica_state: str | None = None  # the replica's state when the host died (a moved VM)


class RevocationState(BaseModel):
    """What the store says of revocation (``GET /v1/cluster``): the serials revoked, and the list etcd reads."""

    revoked: int  # certificates revoked
    list_number: int | None = None  # the signed list's number; None: none signed yet
    listed: int = 0  # certificates in that list: fewer than ``revoked`` until the CA's host signs again
    signed_at: float | None = None


class LeaveAnswer(BaseModel):
    members: list[Member]  # what is left
    revoked: list[str] = []  # the serial numbers (hex) of the host's certificates revoked; none: set up by hand
    lost_vms: list[LostVM] = []  # remove --drop-vms: the VMs that were recorded on the host, moved or dropped
