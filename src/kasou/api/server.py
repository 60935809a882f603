"""The control plane's and REST API's process (``kasou serve``), run by uvicorn. The host agent's
process is assembled in :mod:`kasou.agent.server`: the API never imports the QEMU driver."""

from __future__ import annotations

import ssl

import uvicorn

from kasou.agent.client import AgentClient
from kasou.api.app import create_app
from kasou.api.auth import ensure_token
from kasou.api.deps import Services
from kasou.config import Paths, api_listen, etcd_endpoints, host_name
from kasou.control.hosts import Agents
from kasou.control.leader import Leadership
from kasou.control.notify import notify_config
from kasou.control.revocation import Revocations
from kasou.pki import TlsError, host_client_context, require
from kasou.serving import etcd_tls, is_loopback, log_to_stderr, tls_config, url_host, uvicorn_settings
from kasou.store.etcd import EtcdStore
from kasou.store.sqlite import SqliteStore


def run_api(paths: Paths, address: str | None = None, plain_http: bool = False) -> None:
    """Run the control plane and the REST API in the foreground (``kasou serve``).

    It serves HTTPS with this host's certificate; plain HTTP only when asked for (``plain_http``)
    and bound to a loopback address. Client certificates are optional (people's browsers and the
    CLI have none); the control plane presents its host's certificate to agents and to the leader."""
    host, port = api_listen(address)
    proxies = uvicorn_settings()  # a bad KASOU_TRUSTED_PROXIES is refused before anything starts
    notify = notify_config()  # so are bad notification settings (one line, not a failed start-up)
    if plain_http and not is_loopback(host):
        raise TlsError(f"plain HTTP is served only on 127.0.0.1, not on {host}; leave out --plain-http to serve HTTPS")
    files = paths.tls_files()
    tls = {} if plain_http else tls_config(require(files, "the API on TCP"), "optional")
    endpoints = etcd_endpoints()
    peers: ssl.SSLContext | None = host_client_context(files) if endpoints else None
    paths.ensure()
    log_to_stderr("api")
    token = ensure_token(paths.token_file)
    scheme = "http" if plain_http else "https"

    async def factory() -> Services:
        me = host_name()
        if not endpoints:
            agents = Agents({me: AgentClient(me, uds=str(paths.agent_socket))})
            return Services.build(SqliteStore(paths.state_db), agents, tls=files, notify=notify)
        store = EtcdStore(endpoints, tls=etcd_tls(files, endpoints, peers))
        svc = Services.build(store, Agents(store=store, tls=peers), tls=files, notify=notify)
        svc.membership = store  # etcd's member add and remove (kasou cluster join, leave)
        svc.revocations = Revocations(store, files.ca.parent, paths.etcd_crl)
        svc.leadership = Leadership(
            store, me, f"{scheme}://{url_host(host)}:{port}", on_elected=svc.vms.startup,
            on_deposed=svc.vms.suspend, tls=peers,
        )  # fmt: skip
        return svc

    # Open event streams and consoles would otherwise hold a shutdown until they end: 5 s, then they are cut.
    config = uvicorn.Config(
        create_app(factory, token), host=host, port=port, log_level="warning", timeout_graceful_shutdown=5, **tls,
        **proxies,
    )  # fmt: skip
    uvicorn.Server(config).run()
