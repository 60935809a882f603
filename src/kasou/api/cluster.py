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
from kasou.control import breakglass, hostremoval, revocation, sealed
from kasou.control.audit import keys as audit_keys
from kasou.control.hosts import flags_key
from kasou.control.membership import (
    JoinTokens,
    Membership,
    add_member,
    clear_removed,
    mark_removed,
    members_of,
    remove_member,
    restore_removed,
)
from kasou.errors import Conflict, InvalidSpec, NotFound
from kasou.model.cluster import (
    TOKEN_TTL_S,
    JoinAnswer,
    JoinRequest,
    LeaveAnswer,
    LeaveRequest,
    RemoveRequest,
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
            crl = await revocation.current_crl(svc().store, d)
            # What leave and remove revoke. Written before the member is added: from then on, until the new member
            # runs, etcd has no quorum for any write (a failed join's certificates stay recorded, and are revoked
            # by the leave that takes its member out again).
            await revocation.record_issued(svc().store, name, [host_cert, etcd_cert])
            was_removed = await clear_removed(svc().store, name)  # a new machine under a removed host's name
            try:
                after = await add_member(members, name, address)  # the last step: nothing to undo after it
            except BaseException:
                await restore_removed(svc().store, was_removed)
                raise
            svc().agents.welcome(name)
        except BaseException:
            await tokens.give_back(token)
            raise
        return JoinAnswer(ca=ca_pem.decode(), host_cert=host_cert.decode(), etcd_cert=etcd_cert.decode(),
                          members=after, site_files=files, crl=crl.decode())  # fmt: skip

    async def revoke(host: str, by: str) -> list[str]:
        """The host's certificates revoked (leave and remove): the CA's host signs the list etcd reads."""
        serials = await revocation.revoke_host(svc().store, host, by)
        if svc().revocations is not None:
            svc().revocations.nudge()  # type: ignore[union-attr]
        return serials

    @r.post("/leave")
    async def leave(request: Request, body: LeaveRequest) -> LeaveAnswer:
        """Remove a host's etcd member; refused while VMs run on it (migrate them, or kasou host maintenance)."""
        host = validate_name(body.host, "host")
        members = membership(svc())
        busy = await busy_vms(svc(), host)
        if busy:
            raise Conflict(f"VMs run on {host}: {', '.join(busy)}; move them first (kasou host maintenance {host}) "
                           "or shut them down")  # fmt: skip
        if not any(m.name == host for m in members_of(await members.member_list())):
            raise InvalidSpec(f"{host} has no etcd member in this cluster", field="host")
        after = await remove_member(members, host)
        return LeaveAnswer(members=after, revoked=await revoke(host, (await principal(request)).name))

    @r.post("/remove")
    async def remove(request: Request, body: RemoveRequest) -> LeaveAnswer:
        """Take a host that is down for good (dead hardware, stolen) out of the cluster, from any other host: its
        etcd member removed, its name forgotten. Refused while it is up (it leaves by itself: kasou cluster
        leave) and while VMs are recorded on it (they would be lost with it: delete or restore them first)."""
        host = validate_name(body.host, "host")
        s = svc()
        members = membership(s)
        await s.agents.refresh(force=True)
        if s.agents.is_up(host):
            raise Conflict(f"{host} is up (its guard renews its lease): run kasou cluster leave on {host}; "
                           "remove is for a host that is gone for good")  # fmt: skip
        raw = await members.member_list()
        in_etcd = any(m.get("name") == host for m in raw)
        flagged = await s.store.get(flags_key(host)) is not None
        records = await s.vms.records.all()
        on_it = sorted(r.name for r in records if r.host == host)
        if not (in_etcd or flagged or on_it or host in s.agents.known()):
            raise NotFound(f"no host {host} in this cluster (kasou cluster lists its hosts and etcd members)")
        if on_it and not body.drop_vms:
            raise Conflict(f"VMs are recorded on {host}: {', '.join(on_it)}; their disks were there: with "
                           f"--drop-vms, a replicated one moves, stopped, to its replica's host and the others' "
                           f"records are dropped (restore those from their backups: kasou backup restore)")  # fmt: skip
        waiting = hostremoval.busy(records, host)
        if waiting:
            raise Conflict(f"VMs on {host} have jobs under way: {', '.join(waiting)}; remove {host} when they end")
        who = (await principal(request)).name
        await mark_removed(s.store, host, who)  # first: the old machine's record is ignored from now on
        try:
            after = await remove_member(members, host) if in_etcd else members_of(raw)
        except BaseException:
            await clear_removed(s.store, host)
            raise
        lost = await hostremoval.give_up(s.vms, host, who) if on_it else []
        s.agents.forget(host)
        if flagged:
            await s.store.delete(flags_key(host))
        await s.vms.events.clear(
            f"host-down/{host}", "host_removed", f"host {host} was removed from the cluster by {who}"
        )
        return LeaveAnswer(members=after, revoked=await revoke(host, who), lost_vms=lost)

    return r
