"""``kasou cluster``: the cluster's view, and hosts set up by commands: ``init`` on the first host, ``join`` on
the others, ``leave``; ``token`` makes another join token. (Its files and services: :mod:`kasou.clusterhost`.)

``kasou cluster`` alone shows the cluster as before. Other modules add commands to :data:`cluster_app`
(``cluster_app.command("NAME")``); :mod:`kasou.cli.main` mounts it as ``kasou cluster``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import typer

from kasou import clusterhost as ch
from kasou import pki, services
from kasou.api.auth import ensure_token, read_token
from kasou.api.client import Client
from kasou.cli import balance
from kasou.cli.common import client, fail, say
from kasou.cli.output import JSON, OUTPUT, Col, columns, render_one, view
from kasou.config import Paths, api_url, host_name
from kasou.control import revocation, sealed
from kasou.errors import KasouError
from kasou.model.cluster import (
    ETCD_CLIENT_PORT,
    ETCD_PEER_PORT,
    TOKEN_TTL_S,
    JoinAnswer,
    JoinToken,
    Member,
    check_address,
    url,
)
from kasou.model.names import validate_name
from kasou.model.state import ACTIVE_STATES

cluster_app = typer.Typer(help="The cluster: its hosts and etcd members; hosts join and leave it (or are removed).")

QUORUM_NOTE = (
    "note: with 2 etcd members the cluster needs both: if either host fails, nothing can change until it is "
    "back (VMs keep running). Join a third host: 3 members survive the loss of any one."
)


CLUSTER_COLS = [Col("clustered"), Col("leader"), Col("hosts"), Col("etcd_members", hidden=True),
                Col("revocation", hidden=True)]  # fmt: skip


@cluster_app.callback(invoke_without_command=True)
def show(
    ctx: typer.Context, output: str = OUTPUT, column: list[str] = columns(CLUSTER_COLS), as_json: bool = JSON
) -> None:
    """The virtual environment: the hosts that are up, whose control plane leads, the etcd members."""
    if ctx.invoked_subcommand is not None:
        return
    v = view(output, column, as_json, CLUSTER_COLS)
    c = client().get("/v1/cluster")
    kind = "cluster (etcd)" if c["clustered"] else "single host (SQLite)"
    line = f"{kind}; leader: {c['leader'] or '-'}; hosts up: {', '.join(c['hosts'])}"
    members = c.get("etcd_members")
    if members is not None:
        line += f"; etcd members ({len(members)}): {', '.join(sorted(m['name'] for m in members))}"
    rev = c.get("revocation")
    if rev and rev["revoked"]:
        line += f"; certificates revoked: {rev['revoked']}"
        if rev["listed"] < rev["revoked"]:
            line += f" ({rev['revoked'] - rev['listed']} not yet in etcd's list: the CA's host signs it when it is up)"
    render_one(c, CLUSTER_COLS, v, human=lambda: say(line))


# -- helpers -------------------------------------------------------------------------------------------


def default_address() -> str:
    """The address this host reaches others from (its default route's source address)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))  # TEST-NET-1: nothing is sent; the kernel picks the source address
            return str(s.getsockname()[0])
        except OSError:
            fail("cannot tell this host's address (no default route): give it with --address")


def systemd_choice(systemd: bool | None) -> bool:
    return ch.under_systemd() if systemd is None else systemd


def preflight(paths: Paths, cfg: Path, systemd: bool) -> None:
    """Refuse (nothing changed) on a host that is in a cluster already or runs the single-host services."""
    if ch.read_settings(cfg).get("KASOU_ETCD"):
        fail(f"this host is in a cluster already ({cfg / ch.SETTINGS_FILE}); kasou cluster leave first")
    ch.etcd_binary()
    running = [s for s in services.SERVICES if services.service_pid(paths, s) is not None]
    if running and not systemd:
        fail(
            f"the single-host services run ({', '.join(running)}; kasou up): stop them with kasou down first "
            "(VMs keep running, but a cluster starts with an empty store: move VMs over by backup and restore)"
        )
    if paths.state_db.exists() and paths.state_db.stat().st_size > 0:
        say(f"note: {paths.state_db} (this host's single-host store) is left as it is; the cluster's is in etcd")


def ask(api: str, token: str, verify: Any) -> Callable[[], tuple[dict[str, Any], list[dict[str, Any]]]]:
    def views() -> tuple[dict[str, Any], list[dict[str, Any]]]:
        c = Client(api, token, verify=verify, timeout=5)
        try:
            return dict(c.get("/v1/cluster")), list(c.get("/v1/hosts"))
        finally:
            c.close()

    return views


def undo_all(steps: list[Callable[[], Any]]) -> None:
    for step in reversed(steps):
        with contextlib.suppress(Exception):
            step()


def remove(*paths: Path) -> Callable[[], None]:
    def run() -> None:
        for p in paths:
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)

    return run


def configure(
    paths: Paths, cfg: Path, me: str, address: str, members: list[Member], state: str, fp: str,
    undo: list[Callable[[], Any]], crl: bytes | None,
) -> Path:  # fmt: skip
    """This host's etcd member settings (``state``: new or existing, the cluster's token from the CA's
    fingerprint ``fp``; ``crl``: the site's revocation list, none from a first host that keeps none) and its
    kasou settings, written and applied to this process; the settings file."""
    undo.append(remove(cfg / ch.ETCD_FILE, cfg / ch.SETTINGS_FILE, ch.etcd_data(paths), paths.etcd_crl))
    if crl is not None:
        revocation.write_file(paths.etcd_crl, crl)
    settings = ch.etcd_settings(me, address, paths, members, state, f"kasou-{fp[:16]}", crl=crl is not None)
    ch.write_etcd_settings(cfg, settings)
    settings = ch.host_settings(me, address, paths, cfg, members)
    written = ch.write_settings(cfg, settings)
    ch.apply_settings(settings)
    return written


def bring_up(paths: Paths, cfg: Path, systemd: bool, expected: list[str], undo: list[Callable[[], Any]]) -> float:
    """Start the etcd member, then the agent and the API; wait until the control plane would place a VM."""
    undo.append(lambda: ch.stop_etcd(paths, systemd))
    say(ch.start_etcd(paths, cfg, systemd))
    undo.append(lambda: ch.stop_services(paths, systemd))
    for line in ch.start_services(paths, systemd):
        say(line)
    token = read_token(paths.token_file)
    return services.wait_ready(ask(api_url(), token, pki.trust(paths.tls_files())), expected, services.READY_TIMEOUT)


def join_command(api: str, token: str) -> str:
    return f"kasou cluster join {api} --token {token}"


# -- init ----------------------------------------------------------------------------------------------


SYSTEMD = typer.Option(
    None, "--systemd/--no-systemd", help="Run the services as systemd units (default: under systemd)."
)


@cluster_app.command("init")
def init(
    name: str = typer.Option("kasou site", "--name", help="The site's name (in its CA's subject)."),
    address: str = typer.Option(None, "--address", help="This host's address on the management network."),
    ttl: int = typer.Option(TOKEN_TTL_S, "--ttl", help="Seconds the printed join token stays valid (one use)."),
    systemd: bool = SYSTEMD,
) -> None:
    """Make this host the first of a cluster: the site CA (if absent), its certificate, a 1-member etcd with
    TLS, its settings, its services; then print a join token and the command the other hosts run."""
    paths, cfg, sd = Paths.from_env(), ch.config_dir(), systemd_choice(systemd)
    me = validate_name(host_name(), "host name")
    address = check_address(address or default_address())
    preflight(paths, cfg, sd)
    tls, etls = paths.tls_dir, ch.etcd_tls(paths)
    undo: list[Callable[[], Any]] = []
    try:
        if not (tls / "ca.key").exists():
            if (tls / "ca.crt").exists():
                fail(f"{tls / 'ca.crt'} exists without its key: kasou cluster init makes the site CA itself "
                     "(a hospital's own CA: set up the hosts by hand, docs/operations.md)")  # fmt: skip
            undo.append(remove(tls / "ca.crt", tls / "ca.key"))
            pki.init_ca(tls, name)
            say(f"site CA: {tls / 'ca.crt'} (key {tls / 'ca.key'}, 0600: back it up offline)")
        undo.append(remove(tls / "host.crt", tls / "host.key"))
        pki.issue(tls, me, [address, "127.0.0.1"], ["localhost"], tls)
        undo.append(remove(etls.ca.parent))
        pki.issue(tls, f"etcd-{me}", [address, "127.0.0.1"], [], etls.ca.parent, kasou_host=False)
        say(f"certificates: {tls / 'host.crt'} (host {me}, {address}), {etls.cert} (its etcd member)")
        for f in ("api.token", "secrets.key"):
            if not (cfg / f).exists():
                undo.append(remove(cfg / f))
        ensure_token(cfg / "api.token")
        sealed.load_or_create(cfg / "secrets.key")
        fp = pki.fingerprint((tls / "ca.crt").read_bytes())
        members = [Member(name=me, peer_url=url(address, ETCD_PEER_PORT), client_url=url(address, ETCD_CLIENT_PORT))]
        crl = pki.make_crl(tls, [], 1)  # none revoked yet; the API signs the store's list from now on
        written = configure(paths, cfg, me, address, members, "new", fp, undo, crl)
        say(f"settings: {written}, {cfg / ch.ETCD_FILE}")
        waited = bring_up(paths, cfg, sd, [me], undo)
        say(f"cluster: {me} leads, ready after {waited:.1f} s more")
        c = Client(api_url(), read_token(paths.token_file), verify=pki.trust(paths.tls_files()))
        answer = c.post("/v1/cluster/tokens", json={"ttl_s": ttl})
    except BaseException as e:
        undo_all(undo)
        if isinstance(e, KasouError):
            fail(f"cluster init failed: {e.message} (undone: nothing of it is left)")
        raise
    say(f"join token (one use, valid {ttl // 60} minutes): {answer['token']}")
    say("on each other host, as root:")
    say(f"  {join_command(api_url(), answer['token'])}")
    say(f"kasou commands on this host read {cfg / ch.SETTINGS_FILE} (try: kasou host list)")
    say("a cluster wants 3 hosts: 2 etcd members need both to work; 3 survive the loss of one")


@cluster_app.command("token")
def token(ttl: int = typer.Option(TOKEN_TTL_S, "--ttl", help="Seconds it stays valid (one use).")) -> None:
    """Make a join token (on the host that ran kasou cluster init: it holds the site CA's key)."""
    answer = client().post("/v1/cluster/tokens", json={"ttl_s": ttl})
    say(f"join token (one use, valid {ttl // 60} minutes): {answer['token']}")
    say(f"  {join_command(api_url(), answer['token'])}")


# -- join ----------------------------------------------------------------------------------------------


def fetch_ca(api: str, token: JoinToken) -> bytes:
    """The site CA from the first host, accepted only if its fingerprint is the one the token carries."""
    try:
        # Not verified here by design: what comes back is checked against the token's fingerprint below,
        # and nothing is sent before that (the token's secret goes only over TLS verified with that CA).
        r = httpx.get(f"{api}/v1/cluster/ca", verify=False, timeout=10)
        pem = str(r.json()["ca"]).encode()
    except (httpx.HTTPError, ValueError, KeyError, TypeError) as e:
        fail(f"cannot fetch the site CA from {api}: {e}")
    fp = pki.fingerprint(pem)
    if fp != token.ca_sha256:
        fail(f"the CA at {api} has the fingerprint {fp}, the join token names {token.ca_sha256}: this is not the "
             "site's host (or a man in the middle); nothing was sent and nothing changed")  # fmt: skip
    return pem


@cluster_app.command("join")
def join(
    api: str = typer.Argument(..., help="The first host's API, as kasou cluster init printed it (https://HOST:8470)."),
    token_text: str = typer.Option(..., "--token", help="A join token (kasou cluster init or kasou cluster token)."),
    address: str = typer.Option(None, "--address", help="This host's address on the management network."),
    systemd: bool = SYSTEMD,
) -> None:
    """Join this host to a cluster: its certificates signed by the site CA (its keys never leave it), its etcd
    member added, its services started."""
    paths, cfg, sd = Paths.from_env(), ch.config_dir(), systemd_choice(systemd)
    me = validate_name(host_name(), "host name")
    address = check_address(address or default_address())
    api = api.rstrip("/")
    if not api.startswith("https://"):
        fail(f"{api}: the first host's API is https:// (as kasou cluster init printed it)")
    token = JoinToken.parse(token_text)
    preflight(paths, cfg, sd)
    ca_pem = fetch_ca(api, token)
    host_key, host_csr = pki.make_request(me)
    etcd_key, etcd_csr = pki.make_request(f"etcd-{me}")
    with tempfile.NamedTemporaryFile(suffix=".crt") as f:
        f.write(ca_pem)
        f.flush()
        verify = pki.client_context(Path(f.name))
    body = {"token": str(token), "name": me, "address": address, "host_csr": host_csr.decode(),
            "etcd_csr": etcd_csr.decode()}  # fmt: skip
    try:
        r = httpx.post(f"{api}/v1/cluster/join", json=body, verify=verify, timeout=60)
    except httpx.HTTPError as e:
        fail(f"the join request to {api} failed: {e or type(e).__name__} (nothing changed here)")
    if r.status_code != 200:
        try:
            why = str(r.json().get("message"))
        except ValueError:
            why = f"HTTP {r.status_code}"
        fail(f"the first host refused the join: {why} (nothing changed here)")
    answer = JoinAnswer.model_validate(r.json())
    undo: list[Callable[[], Any]] = []
    api_token = answer.site_files["api.token"].strip()

    def withdraw() -> None:  # the member was added: take it out again
        Client(api, api_token, verify=pki.client_context(paths.tls_files().ca), timeout=30).post(
            "/v1/cluster/leave", json={"host": me}
        )

    tls, etls = paths.tls_dir, ch.etcd_tls(paths)
    try:
        undo.append(withdraw)
        undo.append(remove(tls / "ca.crt", tls / "host.crt", tls / "host.key", etls.ca.parent))
        pki.write_host_files(tls, answer.ca.encode(), answer.host_cert.encode(), host_key)
        pki.write_host_files(etls.ca.parent, answer.ca.encode(), answer.etcd_cert.encode(), etcd_key)
        site_paths = {
            "api.token": cfg / "api.token",
            "secrets.key": cfg / "secrets.key",
            "break-glass.json": paths.home / "break-glass.json",
            "audit.key": paths.home / "audit.key",
        }
        for key, text in answer.site_files.items():
            if key in site_paths:
                undo.append(remove(site_paths[key]))
                ch.write_site_file(site_paths[key], text)
        mine = url(address, ETCD_CLIENT_PORT)
        members = [m if m.name != me else m.model_copy(update={"client_url": mine}) for m in answer.members]
        fp = token.ca_sha256
        crl = answer.crl.encode() if answer.crl is not None else None
        written = configure(paths, cfg, me, address, members, "existing", fp, undo, crl)
        say(f"joined: certificates in {tls}, settings in {written}")
        waited = bring_up(paths, cfg, sd, [me], undo)
        say(f"cluster: {me} registered, ready after {waited:.1f} s more")
    except BaseException as e:
        undo_all(undo)
        if isinstance(e, KasouError):
            fail(f"cluster join failed: {e.message} (undone: the etcd member removed, the files deleted)")
        raise
    say(f"etcd members ({len(members)}): {', '.join(sorted(m.name for m in members))}")
    if len(members) == 2:
        say(QUORUM_NOTE)
    say(f"kasou commands on this host read {cfg / ch.SETTINGS_FILE} (try: kasou host list)")


# -- leave ---------------------------------------------------------------------------------------------


@cluster_app.command("leave")
def leave(
    systemd: bool = typer.Option(
        None,
        "--systemd/--no-systemd",
        help="The services run as systemd units (default: when systemd is the service manager).",
    ),
) -> None:
    """Take this host out of the cluster: refused while VMs run here; removes its etcd member, stops its
    services and its member, and deletes its cluster settings and the site's secrets from it."""
    cfg, sd = ch.config_dir(), systemd_choice(systemd)
    settings = ch.read_settings(cfg)
    if not settings.get("KASOU_ETCD"):
        fail(f"this host is in no cluster (no {cfg / ch.SETTINGS_FILE})")
    ch.apply_settings(settings)
    paths, me = Paths.from_env(), host_name()
    c = client()
    busy = sorted(v["name"] for v in c.get("/v1/vms", params={"host": me}) if v["state"] in ACTIVE_STATES)
    if busy:
        fail(f"VMs run on {me}: {', '.join(busy)}; move them first (kasou host maintenance {me}) or shut them "
             "down, then leave")  # fmt: skip
    view = c.get("/v1/cluster")
    others = [m["name"] for m in view.get("etcd_members") or [] if m["name"] != me]
    if (paths.tls_dir / "ca.key").exists() and others:
        fail(f"{me} holds the site CA's key ({paths.tls_dir / 'ca.key'}), which joins and renewals need: "
             "remove the other hosts first, or move the CA by hand (docs/install.md)")  # fmt: skip
    answer = c.post("/v1/cluster/leave", json={"host": me})
    left = answer["members"]
    say(f"etcd member {me} removed; members left ({len(left)}): {', '.join(sorted(m['name'] for m in left))}")
    say(revoked_line(me, answer.get("revoked") or []))
    for line in ch.stop_services(paths, sd):
        say(line)
    say(ch.stop_etcd(paths, sd))
    tls = paths.tls_dir
    remove(cfg / ch.SETTINGS_FILE, cfg / ch.ETCD_FILE, ch.etcd_data(paths), ch.etcd_tls(paths).ca.parent,
           tls / "host.key", cfg / "api.token", cfg / "secrets.key", paths.home / "break-glass.json")()  # fmt: skip
    say(f"{me} left the cluster: its settings, etcd data, host key and the site's secrets are removed")
    if len(left) == 2:
        say(QUORUM_NOTE)
    for k in settings:
        os.environ.pop(k, None)


def revoked_line(host: str, serials: list[str]) -> str:
    if not serials:
        return (f"no certificate of {host} was recorded (it did not join with kasou cluster join): none revoked; "
                "its certificates stay valid until they expire")  # fmt: skip
    return (f"{host}'s certificates revoked ({len(serials)}): {', '.join(serials)}; etcd and the agents refuse them "
            "(the CA's host signs the new list within seconds)")  # fmt: skip


REMOVE_COLS = [Col("members"), Col("revoked"), Col("lost_vms")]
DROP_VMS_HELP = ("The VMs recorded on it are lost with it: a replicated one moves, stopped, to its replica's host; "
                 "the others' records are dropped (restore them from their backups).")  # fmt: skip


@cluster_app.command("remove")
def remove_host(
    host: str = typer.Argument(..., help="The host that is gone for good (its name)."),
    drop_vms: bool = typer.Option(False, "--drop-vms", help=DROP_VMS_HELP),
    output: str = OUTPUT,
    column: list[str] = columns(REMOVE_COLS),
) -> None:
    """Take a host that is down for good (dead hardware, stolen) out of the cluster, from another host: its etcd
    member is removed, so the others' quorum no longer counts it, and its certificates are revoked. Refused while
    it is up (leave from it) and while VMs are recorded on it."""
    v = view(output, column, False, REMOVE_COLS)
    answer = client().post("/v1/cluster/remove", json={"host": host, "drop_vms": drop_vms})
    left = answer["members"]

    def human() -> None:
        say(f"etcd member {host} removed; members left ({len(left)}): {', '.join(sorted(m['name'] for m in left))}")
        say(f"{host} is forgotten: if the old machine comes back, its record is ignored; a new machine of that "
            "name joins with a join token (kasou cluster token)")  # fmt: skip
        say(revoked_line(host, answer.get("revoked") or []))
        for lost in answer.get("lost_vms") or []:
            if lost["moved_to"]:
                say(f"{lost['vm']}: moved, stopped, to {lost['moved_to']} on its disk replica ({lost['replica_state']} "
                    f"when {host} was lost); start it with kasou vm start {lost['vm']}")  # fmt: skip
            else:
                say(f"{lost['vm']}: its record is dropped (its disks were on {host}); restore it from its backups: "
                    f"kasou backup list {lost['vm']}, kasou backup restore")  # fmt: skip
        say(f"{host} held the site's API token, secrets key and audit key: if the machine may be in other hands, "
            "see docs/install.md, 'Removing a host that is gone'")  # fmt: skip
        if len(left) == 2:
            say(QUORUM_NOTE)

    render_one(answer, REMOVE_COLS, v, human=human)


cluster_app.command("balance")(balance.balance)
cluster_app.command("balance-settings")(balance.balance_settings)
