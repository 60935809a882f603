"""Secrets sealed with the site's secrets key (kasou.control.sealed)."""

from __future__ import annotations

import base64
import os
import threading
from pathlib import Path

import pytest

from kasou.control import sealed
from kasou.errors import StoreError
from kasou.store.sqlite import SqliteStore


def test_seal_open_and_what_is_bound(tmp_path: Path) -> None:
    s = sealed.Sealer(tmp_path / "secrets.key")
    v = s.seal("JBSWY3DPEHPK3PXP", "the TOTP secret of user 'a'")
    assert v.startswith("sealed:v1:") and "JBSWY3DPEHPK3PXP" not in v
    assert s.seal("JBSWY3DPEHPK3PXP", "x") != s.seal("JBSWY3DPEHPK3PXP", "x")  # a fresh nonce each time
    assert s.open(v, "the TOTP secret of user 'a'") == "JBSWY3DPEHPK3PXP"
    with pytest.raises(StoreError, match="altered"):
        s.open(v, "the TOTP secret of user 'b'")
    body = v.rsplit(":", 1)[1]
    flipped = base64.b64encode(bytes([base64.b64decode(body)[0] ^ 1]) + base64.b64decode(body)[1:]).decode()
    with pytest.raises(StoreError, match="altered"):
        s.open(v.replace(body, flipped), "the TOTP secret of user 'a'")
    assert s.open("PLAINBASE32", "w") == "PLAINBASE32"  # written before sealing: read as it is
    key = tmp_path / "secrets.key"
    assert key.stat().st_mode & 0o777 == 0o600 and len(base64.b64decode(key.read_text())) == 32


def test_another_hosts_key_is_named_not_guessed(tmp_path: Path) -> None:
    v = sealed.Sealer(tmp_path / "a.key").seal("s", "w")
    with pytest.raises(StoreError, match="every control-plane host needs the same secrets key"):
        sealed.Sealer(tmp_path / "b.key").open(v, "w")


def test_a_bad_key_file_is_refused_not_replaced(tmp_path: Path) -> None:
    key = tmp_path / "secrets.key"
    key.write_text("not base64 at all\n")
    with pytest.raises(StoreError, match="not 32 bytes"):
        sealed.Sealer(key).seal("s", "w")
    assert key.read_text() == "not base64 at all\n"


def test_processes_making_the_key_at_once_agree(tmp_path: Path) -> None:
    key = tmp_path / "k" / "secrets.key"
    got: list[bytes] = []
    threads = [threading.Thread(target=lambda: got.append(sealed.load_or_create(key))) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert len(got) == 8 and len(set(got)) == 1
    assert os.listdir(key.parent) == ["secrets.key"]  # no temporary file left


def test_where_the_key_is(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KASOU_SECRETS_KEY", raising=False)
    monkeypatch.setenv("KASOU_TOKEN_FILE", str(tmp_path / "site" / "api.token"))
    assert sealed.default_key_path() == tmp_path / "site" / "secrets.key"
    (tmp_path / "db").mkdir()
    assert sealed.default_key_path(SqliteStore(tmp_path / "db" / "state.db")) == tmp_path / "db" / "secrets.key"
    monkeypatch.setenv("KASOU_SECRETS_KEY", str(tmp_path / "elsewhere.key"))
    assert sealed.default_key_path() == tmp_path / "elsewhere.key"
