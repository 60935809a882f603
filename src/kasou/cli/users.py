"""``kasou user``: users who sign in to the web UI and the desktop portal (administrators only)."""

from __future__ import annotations

import sys
import time

import typer

from kasou.cli.common import client, fail, say
from kasou.cli.output import JSON, OUTPUT, Col, columns, render, render_one, view
from kasou.model.names import validate_name

user_app = typer.Typer(help="Users of the API, the web UI and the desktop portal: admin, operator, vendor, auditor, "
                       "clinician.",
                       no_args_is_help=True)  # fmt: skip


def _password(stdin: bool) -> str:
    if stdin:
        pw = sys.stdin.readline().rstrip("\n")
    else:
        pw = typer.prompt("password", hide_input=True, confirmation_prompt=True)
    if not pw:
        fail("no password given")
    return pw


USER_COLS = [
    Col("name"), Col("role"), Col("source", text=lambda u: u.get("source", "local")),
    Col("display_name", "display name", lambda u: u["display_name"]), Col("pools", "desktop pools"),
    Col("departments"), Col("totp", "TOTP", lambda u: "on" if u.get("totp") else ""),
    Col("locked", text=lambda u: "yes" if u["locked"] else ""), Col("created_at", hidden=True),
]  # fmt: skip


@user_app.command("create")
def user_create(
    name: str,
    role: str = typer.Option(..., "--role", help="admin, operator, vendor, manager, auditor or clinician."),
    pool: list[str] = typer.Option([], "--pool", help="Desktop pool the user may use (repeat for several)."),
    department: list[str] = typer.Option(
        [], "--department", help="A vendor's or manager's department (repeat for several)."
    ),
    display_name: str = typer.Option("", "--display-name"),
    password_stdin: bool = typer.Option(False, "--password-stdin", help="Read the password from stdin."),
    output: str = OUTPUT,
    column: list[str] = columns(USER_COLS),
    as_json: bool = JSON,
) -> None:
    """Add a user (the password is asked for, or read from stdin)."""
    v = view(output, column, as_json, USER_COLS)
    validate_name(name, "user")
    body = {"name": name, "role": role, "password": _password(password_stdin), "pools": pool,
            "departments": department, "display_name": display_name}  # fmt: skip
    u = client().post("/v1/users", json=body)
    render_one(u, USER_COLS, v, human=lambda: say(f"user {u['name']}: created ({u['role']})"))


@user_app.command("list")
def user_list(output: str = OUTPUT, column: list[str] = columns(USER_COLS), as_json: bool = JSON) -> None:
    """The users: role, where they sign in from (local or the directory), second factor, locked."""
    v = view(output, column, as_json, USER_COLS)
    render(client().get("/v1/users"), USER_COLS, v)


@user_app.command("delete")
def user_delete(name: str) -> None:
    """Remove a user; their sessions end."""
    validate_name(name, "user")
    client().delete(f"/v1/users/{name}")
    say(f"user {name}: deleted")


@user_app.command("passwd")
def user_passwd(
    name: str, password_stdin: bool = typer.Option(False, "--password-stdin", help="Read it from stdin.")
) -> None:
    """Set a user's password (and unlock the account); every session of the user ends."""
    validate_name(name, "user")
    r = client().post(f"/v1/users/{name}/password", json={"password": _password(password_stdin)})
    n = r.get("sessions_ended", 0)
    say(f"user {name}: password set; {n} session{'' if n == 1 else 's'} ended")


@user_app.command("signout")
def user_signout(name: str) -> None:
    """End every session of a user (web UI, portal; their consoles close). API tokens are revoked separately."""
    validate_name(name, "user")
    n = client().post(f"/v1/users/{name}/signout")["sessions_ended"]
    say(f"user {name}: {n} session{'' if n == 1 else 's'} ended")


@user_app.command("pools")
def user_pools(name: str, pool: list[str] = typer.Option([], "--pool", help="Desktop pool (repeat).")) -> None:
    """Set the desktop pools a user may use."""
    validate_name(name, "user")
    u = client().put(f"/v1/users/{name}/pools", json={"pools": pool})
    say(f"user {name}: desktop pools {', '.join(u['pools']) or '(none)'}")


@user_app.command("departments")
def user_departments(
    name: str, department: list[str] = typer.Option([], "--department", help="Department (repeat).")
) -> None:
    """Set a vendor's departments (the VMs tagged with one of them are theirs to manage)."""
    validate_name(name, "user")
    u = client().put(f"/v1/users/{name}/departments", json={"departments": department})
    say(f"user {name}: departments {', '.join(u['departments']) or '(none)'}")


# -- API tokens for scripts -----------------------------------------------------------------------

token_app = typer.Typer(help="A user's own API tokens for scripts (Authorization: Bearer ksu_...).",
                        no_args_is_help=True)  # fmt: skip
user_app.add_typer(token_app, name="token")


def _when(t: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(t)) if t else "-"


TOKEN_COLS = [
    Col("id"), Col("label", text=lambda x: x["label"]), Col("created_at", "created", lambda x: _when(x["created_at"])),
    Col("expires_at", "expires", lambda x: _when(x["expires_at"])),
    Col("last_used", "last used", lambda x: _when(x["last_used"])),
    Col("expired", "state", lambda x: "expired" if x["expired"] else "valid"), Col("user", hidden=True),
]  # fmt: skip


CREATED_COLS = [*TOKEN_COLS, Col("token", hidden=True)]


@token_app.command("create")
def token_create(
    name: str,
    label: str = typer.Option("", "--label", help="What the token is for (shown in the list)."),
    expires: int = typer.Option(None, "--expires", min=1, max=3650, help="Days until it expires (default: never)."),
    output: str = OUTPUT,
    column: list[str] = columns(CREATED_COLS),
    as_json: bool = JSON,
) -> None:
    """Make an API token acting as the user (their role and departments); it is printed this once (-o value:
    the token alone)."""
    v = view(output, column, as_json, CREATED_COLS)
    validate_name(name, "user")
    t = client().post(f"/v1/users/{name}/tokens", json={"label": label, "expires_days": expires})
    until = f"expires {_when(t['expires_at'])}" if t["expires_at"] else "does not expire"

    def human() -> None:
        say(f"user {name}: API token {t['id']} created ({until}); it is shown only now:")
        say(t["token"])

    render_one(t, CREATED_COLS, v, human=human, default=["token"] if v.format == "value" else None)


@token_app.command("list")
def token_list(name: str, output: str = OUTPUT, column: list[str] = columns(TOKEN_COLS), as_json: bool = JSON) -> None:
    """A user's API tokens (never the tokens themselves)."""
    v = view(output, column, as_json, TOKEN_COLS)
    validate_name(name, "user")
    render(client().get(f"/v1/users/{name}/tokens"), TOKEN_COLS, v)


@token_app.command("revoke")
def token_revoke(name: str, token_id: str = typer.Argument(..., metavar="ID")) -> None:
    """Revoke one of a user's API tokens: it stops working at once."""
    validate_name(name, "user")
    client().delete(f"/v1/users/{name}/tokens/{token_id}")
    say(f"user {name}: API token {token_id} revoked")


# -- TOTP second factor ---------------------------------------------------------------------------

totp_app = typer.Typer(help="The TOTP second factor (RFC 6238: 6 digits, 30 s) for signing in.",
                       no_args_is_help=True)  # fmt: skip
user_app.add_typer(totp_app, name="totp")


@totp_app.command("enroll")
def totp_enroll(name: str) -> None:
    """Make a TOTP secret for the user; it is printed this once (enter it, or the URI as a QR code, in an
    authenticator app), then turn it on with: kasou user totp confirm NAME CODE."""
    validate_name(name, "user")
    e = client().post(f"/v1/users/{name}/totp")
    say(f"user {name}: TOTP secret (shown only now): {e['secret']}")
    say(e["uri"])
    say(f"then: kasou user totp confirm {name} CODE")


@totp_app.command("confirm")
def totp_confirm(name: str, code: str) -> None:
    """Turn TOTP on with a code from the device: from now on signing in needs a code."""
    validate_name(name, "user")
    client().post(f"/v1/users/{name}/totp/confirm", json={"totp": code})
    say(f"user {name}: TOTP on")


@totp_app.command("disable")
def totp_disable(name: str) -> None:
    """Turn TOTP off (a lost device): the user signs in with the password alone until enrolled again."""
    validate_name(name, "user")
    client().delete(f"/v1/users/{name}/totp")
    say(f"user {name}: TOTP off")


# -- the break-glass (emergency) account ------------------------------------------------------------


@user_app.command("break-glass")
def user_break_glass() -> None:
    """Make or replace the break-glass password (run as root on a host: it needs the root API token); it
    is printed this once. Keep it sealed; every use of it is flagged."""
    r = client().post("/v1/users/break-glass")
    say(f"break-glass password {'replaced' if r['replaced'] else 'set'} (kept as a hash in {r['file']}); "
        "it is shown only now:")  # fmt: skip
    say(r["password"])
    say("sign in with the user name break-glass")


@user_app.command("break-glass-ack")
def user_break_glass_ack() -> None:
    """Acknowledge the break-glass uses (after looking into them): their events end."""
    n = client().post("/v1/users/break-glass/acknowledge")["acknowledged"]
    say(f"{n} break-glass use{'' if n == 1 else 's'} acknowledged")
