"""``kasou directory``: sign-in with the hospital's directory (LDAP / Active Directory), administrators only."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any
from urllib.parse import quote

import typer
from rich.table import Table

from kasou.cli.common import client, fail, out, say
from kasou.cli.output import JSON, OUTPUT, cols, columns, render_one, view

directory_app = typer.Typer(help="Sign-in with the hospital's directory (LDAP / Active Directory): its servers, which "
                            "groups give which kasou role, a test of one user.", no_args_is_help=True)  # fmt: skip

AD_FILTER = "(&(objectClass=user)(sAMAccountName={name}))"
DIR_COLS = cols("enabled", "status", "urls", "base_dn", "bind_user", "ca", "user_filter", "starttls", "timeout_s",
                "mappings")  # fmt: skip
OFF_COLS = cols("ok", "was_on")
TEST_COLS = cols("user", "found", "dn", "display_name", "disabled", "groups", "grant", "bind", "url", "elapsed_ms")


def _group(group: str) -> str:
    return quote(group, safe="")


def _show(v: dict[str, Any]) -> None:
    if not v.get("enabled"):
        say("directory sign-in: off")
        return
    say(f"directory sign-in: on ({v.get('status') or 'not asked yet'})")
    say(f"  servers:      {', '.join(v['urls'])}{' (StartTLS)' if v.get('starttls') else ''}")
    say(f"  base DN:      {v['base_dn']}")
    say(f"  service user: {v['bind_user']} (password kept sealed)")
    say(f"  CA:           {v['ca']}")
    say(f"  user filter:  {v['user_filter']}")
    maps = v.get("mappings") or {}
    if not maps:
        say("  no group is mapped yet: kasou directory map GROUP --role ROLE")
        return
    t = Table("group", "role", "departments", "desktop pools")
    for g, m in sorted(maps.items()):
        t.add_row(g, m["role"], ", ".join(m.get("departments", [])) or "-", ", ".join(m.get("pools", [])) or "-")
    out.print(t)


@directory_app.command("set")
def directory_set(
    url: list[str] = typer.Option(..., "--url", help="ldaps://dc1.hospital.local (repeat: fallbacks, tried in order)."),
    base_dn: str = typer.Option(
        ..., "--base-dn", help="Where users and groups are searched, e.g. DC=hospital,DC=local."
    ),
    bind_user: str = typer.Option(..., "--bind-user", help="kasou's service account (its DN, or user@domain on AD)."),
    bind_password_stdin: bool = typer.Option(False, "--bind-password-stdin", help="Read its password from stdin."),
    ca: Path | None = typer.Option(
        None,
        "--ca",
        help="The CA certificate(s) (PEM) the directory's certificate is checked against; default: the system's.",
    ),
    user_filter: str = typer.Option(
        AD_FILTER,
        "--user-filter",
        help="LDAP filter finding a user; {name} is the "
        "sign-in name (e.g. (&(objectClass=inetOrgPerson)(uid={name})) for OpenLDAP).",
    ),
    starttls: bool = typer.Option(False, "--starttls", help="ldap:// URLs upgraded with StartTLS."),
    timeout: float = typer.Option(5.0, "--timeout", help="Seconds for each connect and each answer (1-30)."),
    output: str = OUTPUT,
    column: list[str] = columns(DIR_COLS),
    as_json: bool = JSON,
) -> None:
    """Point kasou at the directory; the service account must bind (over verified TLS) before anything changes."""
    view_ = view(output, column, as_json, DIR_COLS)
    if bind_password_stdin:
        pw = sys.stdin.readline().rstrip("\n")
    else:
        pw = typer.prompt("the service account's password", hide_input=True)
    if not pw:
        fail("no password given for the service account")
    ca_pem = None
    if ca is not None:
        try:
            ca_pem = ca.read_text()
        except (OSError, UnicodeDecodeError) as e:
            fail(f"cannot read the CA file {ca}: {e}")
    body = {"urls": url, "base_dn": base_dn, "bind_user": bind_user, "bind_password": pw, "ca_pem": ca_pem,
            "user_filter": user_filter, "starttls": starttls, "timeout_s": timeout}  # fmt: skip
    v = client().put("/v1/directory", json=body)

    def human() -> None:
        say("directory set: the service account signed in")
        _show(v)

    render_one(v, DIR_COLS, view_, human=human)


@directory_app.command("show")
def directory_show(output: str = OUTPUT, column: list[str] = columns(DIR_COLS), as_json: bool = JSON) -> None:
    """The directory settings (never the password), whether it answers, and the group mappings."""
    view_ = view(output, column, as_json, DIR_COLS)
    v = client().get("/v1/directory")
    render_one(v, DIR_COLS, view_, human=lambda: _show(v))


@directory_app.command("map")
def directory_map(
    group: str = typer.Argument(..., help="The directory group: its name (CN) or its DN."),
    role: str = typer.Option(..., "--role", help="admin, operator, auditor, manager, vendor or clinician."),
    department: list[str] = typer.Option([], "--department", help="A vendor's or manager's department (repeat)."),
    pool: list[str] = typer.Option([], "--pool", help="A desktop pool its members may use (repeat for several)."),
    output: str = OUTPUT,
    column: list[str] = columns(DIR_COLS),
    as_json: bool = JSON,
) -> None:
    """Members of GROUP (nested groups' members too) get ROLE. Of several mapped groups the most powerful role
    wins; departments and pools are united."""
    view_ = view(output, column, as_json, DIR_COLS)
    v = client().put(f"/v1/directory/mappings/{_group(group)}", json={"role": role, "departments": department,
                                                                         "pools": pool})  # fmt: skip
    render_one(v, DIR_COLS, view_, human=lambda: say(f"directory group {group}: {role}"))


@directory_app.command("unmap")
def directory_unmap(
    group: str, output: str = OUTPUT, column: list[str] = columns(DIR_COLS), as_json: bool = JSON
) -> None:
    """GROUP gives no kasou role any more (its members lose it at their next sign-in or re-check)."""
    view_ = view(output, column, as_json, DIR_COLS)
    v = client().delete(f"/v1/directory/mappings/{_group(group)}")
    render_one(v, DIR_COLS, view_, human=lambda: say(f"directory group {group}: no longer mapped"))


@directory_app.command("test")
def directory_test(
    user: str,
    password_stdin: bool = typer.Option(
        False, "--password-stdin", help="Also try the user's bind (password from stdin)."
    ),
    output: str = OUTPUT,
    column: list[str] = columns(TEST_COLS),
    as_json: bool = JSON,
) -> None:
    """USER as the directory has them: DN, groups (nested ones too), and the role, departments and pools kasou
    would give; with --password-stdin, whether their password binds."""
    view_ = view(output, column, as_json, TEST_COLS)
    body: dict[str, Any] = {"user": user}
    if password_stdin:
        body["password"] = sys.stdin.readline().rstrip("\n")
    r = client().post("/v1/directory/test", json=body)
    if not view_.human:
        render_one(r, TEST_COLS, view_)
        return
    if not r["found"]:
        say(f"{user}: not found in the directory ({r.get('url') or 'no server'}, {r['elapsed_ms']:.0f} ms)")
        raise typer.Exit(1)
    g = r["grant"]
    say(f"{user}: {r['dn']}{' (DISABLED)' if r['disabled'] else ''}")
    say(f"  display name: {r['display_name'] or '-'}")
    say(f"  groups:       {', '.join(x['name'] for x in r['groups']) or '-'}")
    if g["role"] is None:
        say("  kasou role:   none (no mapped group): sign-in refused")
    else:
        say(f"  kasou role:   {g['role']} (from {', '.join(g['groups'])})")
        say(f"  departments:  {', '.join(g['departments']) or '-'}")
        say(f"  pools:        {', '.join(g['pools']) or '-'}")
    say(f"  bind:         {r['bind']}")
    say(f"  answered by:  {r['url']} in {r['elapsed_ms']:.0f} ms")
    if r["bind"] not in ("ok", "not tried"):
        raise typer.Exit(1)


@directory_app.command("off")
def directory_off(output: str = OUTPUT, column: list[str] = columns(OFF_COLS), as_json: bool = JSON) -> None:
    """Stop directory sign-in (local users and break-glass are not touched)."""
    view_ = view(output, column, as_json, OFF_COLS)
    r = client().delete("/v1/directory")
    render_one(r, OFF_COLS, view_, human=lambda: say("directory sign-in: off" + ("" if r["was_on"] else
                                                                                  " (it was not on)")))  # fmt: skip
