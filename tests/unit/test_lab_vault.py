"""The pure parts of the lab's backup server (``kasou lab up --backup-server``): its recorded state, the
setting kasou is given, and its status line."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from kasou.cli.lab import backup_server_line
from kasou.lab import vault
from kasou.lab.state import EtcdMember, LabHost, LabState
from kasou.vault.crypt import BackupKey


def _state(tmp: Path, with_vault: bool) -> LabState:
    h = LabHost(name="h1", index=1, netns="klab-h1", veth="klab-h1", address="10.88.0.11", dir=str(tmp / "h1"))
    m = EtcdMember(name="m0", client_url="https://10.88.0.1:2379", peer_url="https://10.88.0.1:2380")
    return LabState(dir=str(tmp), images="/img", hosts=[h], etcd=[m],
                    backup_server=vault.plan(tmp) if with_vault else None)  # fmt: skip


def test_the_backup_server_lives_beside_the_hosts_in_its_own_namespace(tmp_path: Path) -> None:
    v = vault.plan(tmp_path)
    assert (v.netns, v.veth, v.address, v.url) == ("klab-backup", "klab-backup", "10.88.0.5", "https://10.88.0.5:8472")
    assert len(v.veth) <= 15  # a Linux interface name
    assert v.data_dir == tmp_path / "backup-server" / "data"
    assert v.argv() == ["backup-server", "serve", "--dir", str(v.data_dir), "--listen", "10.88.0.5:8472"]
    assert v.key_file.parent == v.token_file.parent == tmp_path / "backup-server"


def test_the_lab_state_keeps_its_backup_server_and_reads_a_lab_without_one(tmp_path: Path) -> None:
    st = _state(tmp_path, with_vault=True)
    assert st.backup_server is not None
    st.backup_server.pid, st.backup_server.fingerprint = 4242, "ab" * 32
    again = LabState.from_dict(json.loads(json.dumps(asdict(st))))
    assert again.backup_server == st.backup_server
    old = asdict(_state(tmp_path, with_vault=False))
    del old["backup_server"]  # lab.json written before labs had a backup server
    assert LabState.from_dict(old).backup_server is None


def test_kasou_is_given_the_servers_url_pin_writer_token_and_the_public_key_only(tmp_path: Path) -> None:
    v = vault.plan(tmp_path)
    v.fingerprint = "cd" * 32
    key = BackupKey.generate()
    body = vault.setting(v, "kbs1_token", key.public())
    assert body["url"] == "https://10.88.0.5:8472" and body["token"] == "kbs1_token"
    assert body["fingerprint"] == "cd" * 32
    assert body["public_key"] == json.loads(key.public().to_json())
    assert json.loads(key.to_json()) != body["public_key"]  # the private part stays in the lab's directory


def test_kasou_is_set_again_only_when_it_points_elsewhere(tmp_path: Path) -> None:
    v = vault.plan(tmp_path)
    assert not vault.is_set(None, v, "sid")
    assert vault.is_set({"url": v.url, "server_id": "sid"}, v, "sid")
    assert not vault.is_set({"url": v.url, "server_id": "other"}, v, "sid")  # a new data directory
    assert not vault.is_set({"url": "https://backup1:8472", "server_id": "sid"}, v, "sid")


def test_status_line_says_where_it_is_and_whether_it_answers() -> None:
    b = {"address": "10.88.0.5", "url": "https://10.88.0.5:8472", "netns": "klab-backup", "netns_exists": True,
         "link": "up", "pid": 77, "alive": True, "answers": True}  # fmt: skip
    line = backup_server_line(b)
    assert line.startswith("backup server 10.88.0.5") and "https://10.88.0.5:8472 answers (pid 77)" in line
    down = backup_server_line({**b, "alive": False, "answers": False, "netns_exists": False})
    assert down.endswith(" down") and "klab-backup (missing)" in down
