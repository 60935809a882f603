"""Secrets (tokens, session cookies, console tickets, passwords, keys) never appear in logs, error messages or
the audit log; files holding them are mode 0600.

Requests that carry them, right and wrong, are driven through the API with every logger at DEBUG; then the
log, every answer (but the one that hands a secret out on purpose) and the audit export are searched.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import stat
from pathlib import Path
from typing import Any

import pytest
from starlette.websockets import WebSocketDisconnect

from kasou import pki
from kasou.api.auth import ensure_token
from kasou.control import sealed
from kasou.control.audit.keys import load_or_create
from tests.functional.conftest import TOKEN, Env

PW = "first password 0qR7"
NEW_PW = "second password 9xK2"
WRONG_PW = "wrong password 5tZ1"


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_secrets_stay_out_of_logs_errors_and_the_audit_log(env: Env, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    api = env.api
    env.create("vm1", start=True)
    secret_values: dict[str, str] = {"root token": TOKEN, "password": PW, "new password": NEW_PW,
                                     "wrong password": WRONG_PW}  # fmt: skip
    answers: list[tuple[str, Any]] = []  # (what, response) searched at the end

    def keep(what: str, r: Any) -> Any:
        answers.append((what, r))
        return r

    keep("create user", api.post("/v1/users", json={"name": "ope", "role": "operator", "password": PW}))
    # Refused passwords: the message says what is wrong, not what was sent.
    for bad in ("short9", " leading space password", "line\nbreak password 1"):
        secret_values[f"refused password {bad!r}"] = bad
        r = keep("bad password", api.post("/v1/users", json={"name": "ope2", "role": "operator", "password": bad}))
        assert r.status_code == 422
        r = keep("bad password change", api.post("/v1/users/ope/password", json={"password": bad}))
        assert r.status_code == 422
    # Wrong tokens and wrong passwords.
    wrong_token = "kasou-" + secrets.token_urlsafe(24)
    secret_values["wrong token"] = wrong_token
    r = keep("wrong token", api.get("/v1/vms", headers={"Authorization": f"Bearer {wrong_token}"}))
    assert r.status_code == 401
    r = keep(
        "wrong token post", api.post("/v1/vms", json={"name": "x"}, headers={"Authorization": f"Bearer {wrong_token}"})
    )
    assert r.status_code == 401
    r = keep("wrong password", api.post("/v1/auth/login", json={"name": "ope", "password": WRONG_PW}))
    assert r.status_code == 401
    r = keep("no such user", api.post("/v1/auth/login", json={"name": "nobody", "password": WRONG_PW}))
    assert r.status_code == 401
    # A session.
    r = api.post("/v1/auth/login", json={"name": "ope", "password": PW})
    assert r.status_code == 200, r.text
    session = r.cookies["kasou_session"]
    secret_values["session cookie"] = session
    api.cookies.clear()
    op = {"Authorization": "", "Cookie": f"kasou_session={session}", "x-kasou-csrf": "1"}
    keep("session read", api.get("/v1/vms", headers=op))
    keep("session refused", api.get("/v1/users", headers=op))
    fake = {"Authorization": "", "Cookie": "kasou_session=" + secrets.token_urlsafe(32)}
    secret_values["wrong session"] = fake["Cookie"].split("=", 1)[1]
    keep("wrong session", api.get("/v1/vms", headers=fake))
    # A console ticket, used right and wrong.
    r = api.post("/v1/vms/vm1/console-ticket", headers=op)
    assert r.status_code == 200, r.text
    ticket = r.json()["ticket"]
    secret_values["console ticket"] = ticket
    wrong_ticket = secrets.token_urlsafe(24)
    secret_values["wrong ticket"] = wrong_ticket
    for t in (wrong_ticket, ticket, ticket):  # the second use of a ticket is refused
        with (
            contextlib.suppress(WebSocketDisconnect),
            api.websocket_connect(f"/v1/console/ws?ticket={t}", headers=op) as ws,
        ):
            ws.receive_bytes()
    # A user's API token.
    r = api.post("/v1/users/ope/tokens", json={"label": "script"})
    assert r.status_code == 201, r.text
    user_token = r.json()["token"]
    secret_values["user token"] = user_token
    keep("user token read", api.get("/v1/vms", headers={"Authorization": f"Bearer {user_token}"}))
    keep("user token refused", api.get("/v1/users", headers={"Authorization": f"Bearer {user_token}"}))
    keep("password change", api.post("/v1/users/ope/password", json={"password": NEW_PW}))
    keep("old session", api.get("/v1/vms", headers=op))
    keep("logout", api.post("/v1/auth/logout", headers=op))
    # The audit signing key.
    r = keep("checkpoint", api.post("/v1/audit/checkpoint"))
    assert r.status_code == 200, r.text
    key_text = (env.tmp / "audit.key").read_text()
    key_body = "".join(line for line in key_text.splitlines() if "-----" not in line)
    secret_values["audit signing key"] = key_body

    export_json = api.get("/v1/audit/export", params={"format": "json"}).text
    export_csv = api.get("/v1/audit/export", params={"format": "csv"}).text
    assert '"login_failed"' in export_json and "console" in export_json

    where: dict[str, str] = {"log": caplog.text, "audit export (JSON)": export_json, "audit export (CSV)": export_csv}
    for what, r in answers:
        where[f"answer to {what}"] = r.text + "\n" + "\n".join(f"{k}: {v}" for k, v in r.headers.items())
    leaks = [f"{name} in the {place}" for name, value in secret_values.items() for place, text in where.items()
             if value in text]  # fmt: skip
    assert not leaks, leaks
    assert caplog.records, "nothing was logged: the search would prove nothing"


def test_files_holding_secrets_are_0600(env: Env, tmp_path: Path) -> None:
    old = os.umask(0o022)  # a usual umask: a file made without care would be 0644
    try:
        token_file = ensure_token(tmp_path / "home" / "api.token")
        assert _mode(tmp_path / "home" / "api.token") == 0o600 and token_file
        ensure_token(tmp_path / "home" / "api.token")  # read again: unchanged
        assert _mode(tmp_path / "home" / "api.token") == 0o600
        load_or_create(tmp_path / "home" / "audit.key")
        assert _mode(tmp_path / "home" / "audit.key") == 0o600
        sealed.load_or_create(tmp_path / "home" / "secrets.key")
        assert _mode(tmp_path / "home" / "secrets.key") == 0o600
    finally:
        os.umask(old)
    # What the running API wrote into its home: the audit key at its first checkpoint.
    assert env.api.post("/v1/audit/checkpoint").status_code == 200
    env.create("vm1")
    assert env.api.post("/v1/audit/checkpoint").status_code == 200
    assert _mode(env.tmp / "audit.key") == 0o600
    # Every file in the homes that holds a key, a token or a password hash.
    secret_files = [p for root in (env.tmp, tmp_path) for p in root.rglob("*") if p.is_file() and _holds_secret(p)]
    assert secret_files
    for p in secret_files:
        assert _mode(p) == 0o600, (p, oct(_mode(p)))


def test_tls_keys_are_0600(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        pki.init_ca(tmp_path / "ca")
        pki.issue(tmp_path / "ca", "h1", ["127.0.0.1"], ["localhost"], tmp_path / "host")
    finally:
        os.umask(old)
    keys = [p for p in tmp_path.rglob("*") if p.is_file() and _holds_secret(p)]
    assert keys
    for p in keys:
        assert _mode(p) == 0o600, (p, oct(_mode(p)))


def _holds_secret(p: Path) -> bool:
    if p.suffix in (".key", ".token") or p.name in ("api.token", "break-glass", "break-glass.json"):
        return True
    try:
        head = p.read_bytes()[:4096]
    except OSError:
        return False
    return b"PRIVATE KEY" in head or b"$argon2" in head
