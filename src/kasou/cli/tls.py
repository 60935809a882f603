"""``kasou tls``: the site CA and the hosts' certificates (kasou.pki)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from rich.table import Table
from rich.text import Text

from kasou import pki
from kasou.cli.common import out, say
from kasou.cli.output import JSON, OUTPUT, Col, cols, columns, render, view
from kasou.config import Paths, host_name

tls_app = typer.Typer(help="TLS: the site CA and the hosts' certificates.", no_args_is_help=True)


@tls_app.command("init")
def tls_init(
    site: str = typer.Option("kasou site", "--site", help="The site's name, in the CA's subject."),
    ip: list[str] = typer.Option([], "--ip", help="This host's addresses (repeat); 127.0.0.1 and ::1 are added."),
    dns: list[str] = typer.Option([], "--dns", help="This host's DNS names (repeat); its host name is added."),
    days: int = typer.Option(pki.HOST_DAYS, "--days", help="Validity of this host's certificate."),
) -> None:
    """Make the site CA (ca.key 0600) and this host's certificate in KASOU_TLS_DIR."""
    d = Paths.from_env().tls_dir
    pki.init_ca(d, site)
    me = host_name()
    pki.issue(d, me, ["127.0.0.1", "::1", *ip], ["localhost", *dns], d, days)
    say(f"CA: {d / 'ca.crt'} (key {d / 'ca.key'}, mode 0600: keep it on this machine, back it up offline)")
    say(f"host {me}: {d / 'host.crt'}, {d / 'host.key'}")
    say("other hosts: kasou tls issue HOST --ip ADDRESS, then copy the directory it names to that host")


@tls_app.command("issue")
def tls_issue(
    host: str,
    ip: list[str] = typer.Option([], "--ip", help="The host's addresses (repeat)."),
    dns: list[str] = typer.Option([], "--dns", help="More DNS names (repeat); the host's name is always one."),
    days: int = typer.Option(pki.HOST_DAYS, "--days"),
    out_dir: Path = typer.Option(None, "--out", help="Where to write (default: KASOU_TLS_DIR/issued/HOST)."),
    service: bool = typer.Option(
        False, "--service", help="For a service that is not a kasou host (etcd, monitoring): no kasou host marker."
    ),
) -> None:
    """Sign a certificate for HOST (server and client use) with the site CA; issuing again renews it.

    A host's certificate carries kasou's host marker (OU=kasou host): agents and the leader answer only
    certificates with it (or naming a registered host), not everything the CA signed."""
    d = Paths.from_env().tls_dir
    target = out_dir or d / "issued" / host
    crt, key = pki.issue(d, host, ip, dns, target, days, kasou_host=not service)
    say(f"{'service' if service else 'host'} {host}: {crt}, {key} (0600), {target / 'ca.crt'}")
    say(f"install: copy {target}/ to {host}'s KASOU_TLS_DIR (default /var/lib/kasou/tls), mode 0700")


@tls_app.command("renew")
def tls_renew(
    host: str = typer.Argument(None, help="An issued host (default: this host's own certificate)."),
    days: int = typer.Option(pki.HOST_DAYS, "--days"),
    service: bool = typer.Option(False, "--service", help="A service's certificate: no kasou host marker."),
) -> None:
    """Issue a certificate again with the same names and addresses, a new key and a new expiry (a host's
    certificate made before kasou's host marker existed gets it)."""
    d = Paths.from_env().tls_dir
    target = d if host is None else d / "issued" / host
    crt, _ = pki.renew(d, target, days, kasou_host=not service)
    c = pki.info(crt)
    say(f"{crt}: renewed, valid until {c.not_after:%Y-%m-%d} ({c.days_left} days); restart kasou to use it")


TLS_COLS = [
    Col("role"), Col("subject"), Col("sans", "SANs", value=lambda r: r.get("dns", []) + r.get("ips", [])),
    Col("not_after", "expires"), Col("sha256", "SHA-256"), Col("verified_by_ca", "chain"),
    Col("kasou_host", "kasou host"),
    *cols(hidden=("path", "issuer", "days_left", "dns", "ips", "missing")),
]  # fmt: skip


@tls_app.command("show")
def tls_show(output: str = OUTPUT, column: list[str] = columns(TLS_COLS), as_json: bool = JSON) -> None:
    """The CA and the certificates this host uses or issued: subjects, SANs, expiry, fingerprints."""
    v = view(output, column, as_json, TLS_COLS)
    paths = Paths.from_env()
    files = paths.tls_files()
    found: list[tuple[str, Path]] = [("ca", files.ca), ("host", files.cert)]
    issued = paths.tls_dir / "issued"
    if issued.is_dir():
        found += [(f"issued {p.parent.name}", p) for p in sorted(issued.glob("*/host.crt"))]
    rows: list[dict[str, Any]] = []
    for role, path in found:
        if not path.is_file():
            rows.append({"role": role, "path": str(path), "missing": True})
            continue
        c = pki.info(path)
        try:
            if role != "ca":
                pki.verify(path, files.ca)
            verified = "yes"
        except pki.TlsError as e:
            verified = f"no: {e.message}"
        rows.append({
            "role": role, "path": str(path), "subject": c.subject, "issuer": c.issuer,
            "not_after": c.not_after.isoformat(), "days_left": c.days_left, "sha256": c.sha256,
            "dns": c.dns, "ips": c.ips, "verified_by_ca": verified,
            "kasou_host": role != "ca" and pki.is_kasou_host(pki.load_cert(path)),
        })  # fmt: skip
    if not v.human:
        render(rows, TLS_COLS, v)
        return
    t = Table("role", "subject", "SANs", "expires", "SHA-256", "chain", "kasou host")
    for r in rows:
        if r.get("missing"):
            t.add_row(r["role"], f"missing: {r['path']}", "", "", "", "", "")
            continue
        left = r["days_left"]
        expiry = f"{r['not_after'][:10]} ({left} d{', RENEW' if left < pki.RENEW_WARN_DAYS else ''})"
        marker = "" if r["role"] == "ca" else ("yes" if r["kasou_host"] else "no")
        # Text: a fingerprint is not markup (":CD:" would print as an emoji)
        t.add_row(r["role"], Text(r["subject"]), ", ".join(r["dns"] + r["ips"]), expiry, Text(r["sha256"]),
                  Text(r["verified_by_ca"]), marker)  # fmt: skip
    out.print(t)
