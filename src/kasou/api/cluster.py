"""``/v1/cluster/...``: hosts join and leave the cluster (``kasou cluster join``, ``leave``, ``token``).

``GET /v1/cluster/ca`` is public: the site CA's certificate, which a joining host checks against the
fingerprint in its join token before it sends anything. ``POST /v1/cluster/join`` is authenticated by the
join token alone (one use, time-limited: :mod:`kasou.control.membership`) and answered by the host that
holds the site CA's key (the one that ran ``kasou cluster init``), never forwarded to the leader: it signs
the joining host's certificate signing requests (its keys never leave it), adds its etcd member and hands
it the site's shared files (the API token, the secrets key, the break-glass hash, the audit key), which a
cluster's hosts all hold.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path

from fastapi import APIRouter, Request

from kasou import pki
from kasou.api.auth import Principal
from kasou.api.deps import Services
from kasou.config import Paths
from kasou.control import breakglass, sealed
from kasou.control.audit import keys as audit_keys
from kasou.control.membership import JoinTokens, Membership, add_member, members_of, remove_member
from kasou.errors import Conflict, InvalidSpec, NotFound
from kasou.model.cluster import (
    TOKEN_TTL_S,
    JoinAnswer,
    JoinRequest,
    LeaveAnswer,
    LeaveRequest,
    TokenAnswer,
    TokenRequest,
    check_address,
)
from kasou.model.names import validate_name
from kasou.model.state import ACTIVE_STATES

#: What a joining host gets of the site's files, and where this host has each.
SITE_FILES = ("api.token", "secrets.key", "break-glass.json", "audit.key")
NOT_FORWARDED = ("/v1/cluster/join", "/v1/cluster/tokens")  # answered by the host that holds the CA key


def site_paths(svc: Services) -> dict[str, Path]:
    return {
        "api.token": Paths.from_env().token_file,
        "secrets.key": sealed.default_key_path(svc.store),
        "break-glass.json": breakglass.default_path(svc.store),
        "audit.key": audit_keys.default_key_path(svc.store),
    }


def ca_dir() -> Path:
    """The site CA's directory on this host: it must hold ``ca.key`` to sign a joining host's certificates."""
    files = Paths.from_env().tls_files()
    d = files.ca.parent
    if not (d / "ca.key").is_file():
        raise Conflict(
            "this host does not hold the site CA's key: join through the host that ran kasou cluster init "
            "(its API URL is in the join command it printed)"
        )
    return d


def membership(svc: Services) -> Membership:
    if svc.membership is None:
        raise Conflict("this host is a single host (SQLite), not a cluster: set it up with kasou cluster init")
    return svc.membership


async def busy_vms(svc: Services, host: str) -> list[str]:
    return sorted(v.name for v in await svc.vms.list_all() if v.host == host and v.state in ACTIVE_STATES)


def cluster_routes(svc: Callable[[], Services], principal: Callable[[Request], Awaitable[Principal]]) -> APIRouter:
    r = APIRouter(prefix="/v1/cluster")

    @r.get("/ca")
    async def site_ca() -> dict[str, str]:
        """The site CA's certificate (PEM): a joining host checks its fingerprint against its join token."""
        ca = Paths.from_env().tls_files().ca
        if not ca.is_file():
            raise NotFound("this host has no site CA (a cluster is set up with kasou cluster init)")
        return {"ca": pki.pem_of(ca).decode()}

    @r.post("/tokens", status_code=201)
    async def make_token(request: Request, body: TokenRequest | None = None) -> TokenAnswer:
        """A join token (one use; one hour unless ``ttl_s`` says otherwise, at most a day)."""
        req = body or TokenRequest(ttl_s=TOKEN_TTL_S)
        d = ca_dir()
        membership(svc())
        who = (await principal(request)).name
        fp = pki.fingerprint((d / "ca.crt").read_bytes())
        token, expires = await JoinTokens(svc().store).create(fp, req.ttl_s, who)
        return TokenAnswer(token=str(token), expires=expires)

    @r.post("/join")
    async def join(body: JoinRequest) -> JoinAnswer:
        """Join a host: its certificates signed, its etcd member added; the token is used up."""
        name = validate_name(body.name, "host name")
        address = check_address(body.address)
        d = ca_dir()
        members = membership(svc())
        ca_pem = (d / "ca.crt").read_bytes()
        tokens = JoinTokens(svc().store)
        token = await tokens.claim(body.token, pki.fingerprint(ca_pem), name)
        try:
            if name in svc().agents.known():
                raise Conflict(f"a host named {name} is registered in the cluster already")
            ips = [address, "127.0.0.1"]
            host_cert = pki.sign_request(d, body.host_csr, name, ips, ["localhost"])
            etcd_cert = pki.sign_request(d, body.etcd_csr, f"etcd-{name}", ips, [], kasou_host=False)
            files = {}
            for key, path in site_paths(svc()).items():
                if path.is_file():
                    files[key] = path.read_text()
            if "api.token" not in files:
                raise Conflict(f"this host has no API token file ({site_paths(svc())['api.token']}) to share")
            after = await add_member(members, name, address)  # the last step: nothing to undo after it
        except BaseException:
            await tokens.give_back(token)
            raise
        return JoinAnswer(ca=ca_pem.decode(), host_cert=host_cert.decode(), etcd_cert=etcd_cert.decode(),
                          members=after, site_files=files)  # fmt: skip

    @r.post("/leave")
    async def leave(body: LeaveRequest) -> LeaveAnswer:
        """Remove a host's etcd member; refused while VMs run on it (migrate them, or kasou host maintenance)."""
        host = validate_name(body.host, "host")
        members = membership(svc())
        busy = await busy_vms(svc(), host)
        if busy:
            raise Conflict(f"VMs run on {host}: {', '.join(busy)}; move them first (kasou host maintenance {host}) "
                           "or shut them down")  # fmt: skip
        if not any(m.name == host for m in members_of(await members.member_list())):
            raise InvalidSpec(f"{host} has no etcd member in this cluster", field="host")
        return LeaveAnswer(members=await remove_member(members, host))

    return r
