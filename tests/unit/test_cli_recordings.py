"""``kasou console recordings export``: the file is written (0600, never over another), checked, and a damaged
or refused answer leaves nothing behind."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest
from typer.testing import CliRunner

from kasou.api.client import Client
from kasou.cli import recordings as cli_rec
from kasou.cli.main import app
from tests.cli_errors import error_of

REC = {"id": "a" * 32, "vm": "emr1", "user": "v1", "started": 1.0, "ended": 61.0}


def fake(monkeypatch: pytest.MonkeyPatch, handler: Any) -> None:
    http = httpx.Client(base_url="http://kasou", transport=httpx.MockTransport(handler))
    monkeypatch.setattr(cli_rec, "client", lambda: Client("http://kasou", "t", http=http))


def test_export_writes_a_checked_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    head = {"recording": REC, "digest_ok": True, "sha256": "ab" * 32}
    body = cli_rec.EXPORT_MAGIC + json.dumps(head).encode() + b"\n" + b"\0" * 100
    fake(monkeypatch, lambda req: httpx.Response(200, content=body))
    out = tmp_path / "r.export"
    r = CliRunner().invoke(app, ["console", "recordings", "export", "a" * 32, "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert out.read_bytes() == body and oct(out.stat().st_mode & 0o777) == "0o600"
    assert "digest verified" in r.output
    r = CliRunner().invoke(app, ["console", "recordings", "export", "a" * 32, "--out", str(out)])
    assert r.exit_code == 1 and "cannot make" in r.output  # never over an existing file


def test_a_refused_or_damaged_export_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    err = {"code": "conflict", "message": "frame 3 of recording aaaa does not open"}
    fake(monkeypatch, lambda req: httpx.Response(409, json=err))
    out = tmp_path / "r.export"
    r = CliRunner().invoke(app, ["console", "recordings", "export", "a" * 32, "--out", str(out)])
    assert "does not open" in error_of(r) and r.exit_code == 4 and not out.exists()
    head = {"recording": REC, "digest_ok": False, "sha256": "cd" * 32}
    fake(monkeypatch, lambda req: httpx.Response(200, content=cli_rec.EXPORT_MAGIC + json.dumps(head).encode() + b"\n"))
    r = CliRunner().invoke(app, ["console", "recordings", "export", "a" * 32, "--out", str(out)])
    assert r.exit_code == 1 and "DIGEST MISMATCH" in r.output
