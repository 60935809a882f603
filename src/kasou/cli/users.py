"""``kasou user``: users who sign in to the web UI and the desktop portal (administrators only)."""

from __future__ import annotations

import sys

import typer
from rich.table import Table

from kasou.cli.common import client, fail, out, print_json, say
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


@user_app.command("create")
def user_create(
    name: str,
    role: str = typer.Option(..., "--role", help="admin, operator, vendor, auditor or clinician."),
    pool: list[str] = typer.Option([], "--pool", help="Desktop pool the user may use (repeat for several)."),
    department: list[str] = typer.Option([], "--department", help="A vendor's department (repeat for several)."),
    display_name: str = typer.Option("", "--display-name"),
    password_stdin: bool = typer.Option(False, "--password-stdin", help="Read the password from stdin."),
) -> None:
    """Add a user (the password is asked for, or read from stdin)."""
    validate_name(name, "user")
    body = {"name": name, "role": role, "password": _password(password_stdin), "pools": pool,
            "departments": department, "display_name": display_name}  # fmt: skip
    u = client().post("/v1/users", json=body)
    say(f"user {u['name']}: created ({u['role']})")


@user_app.command("list")
def user_list(as_json: bool = typer.Option(False, "--json")) -> None:
    users = client().get("/v1/users")
    if as_json:
        print_json(users)
        return
    t = Table("name", "role", "display name", "desktop pools", "departments", "locked")
    for u in users:
        t.add_row(u["name"], u["role"], u["display_name"], ", ".join(u["pools"]) or "-",
                  ", ".join(u.get("departments", [])) or "-", "yes" if u["locked"] else "")  # fmt: skip
    out.print(t)


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
    """Set a user's password (and unlock the account)."""
    validate_name(name, "user")
    client().post(f"/v1/users/{name}/password", json={"password": _password(password_stdin)})
    say(f"user {name}: password set")


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
