"""The pure parts of the lab's directory (``kasou lab up --directory``): where it lives, its recorded state, and
what kasou is told of it."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from kasou.lab import directory as labdir
from kasou.lab.state import EtcdMember, LabHost, LabState
from kasou.model.directory import DirectorySet, GroupMapping


def test_the_dc_lives_beside_the_hosts_in_its_own_namespace(tmp_path: Path) -> None:
    d = labdir.plan(tmp_path)
    assert (d.netns, d.veth, d.address, d.url) == ("klab-dir", "klab-dir", "10.88.0.6", "ldaps://10.88.0.6")
    assert len(d.veth) <= 15
    assert d.conf == tmp_path / "directory" / "dc" / "etc" / "smb.conf"
    assert labdir.argv(d.conf)[:4] == ["samba", "--foreground", "--no-process-group", "-M"]


def test_the_lab_state_keeps_its_directory_and_reads_a_lab_without_one(tmp_path: Path) -> None:
    h = LabHost(name="h1", index=1, netns="klab-h1", veth="klab-h1", address="10.88.0.11", dir=str(tmp_path / "h1"))
    m = EtcdMember(name="m0", client_url="https://10.88.0.1:2379", peer_url="https://10.88.0.1:2380")
    st = LabState(dir=str(tmp_path), images="/img", hosts=[h], etcd=[m], directory=labdir.plan(tmp_path))
    assert st.directory is not None
    st.directory.pid = 4242
    again = LabState.from_dict(json.loads(json.dumps(asdict(st))))
    assert again.directory == st.directory
    old = asdict(st)
    del old["directory"]  # lab.json written before labs had a directory
    assert LabState.from_dict(old).directory is None


def test_what_kasou_is_told_is_what_kasou_takes() -> None:
    for m in labdir.LAB_MAPPINGS.values():
        GroupMapping.parse(m)
    DirectorySet.parse({"urls": ["ldaps://10.88.0.6"], "base_dn": labdir.BASE_DN,
                        "bind_user": f"CN={labdir.SERVICE},CN=Users,{labdir.BASE_DN}", "bind_password": "x"})  # fmt: skip
    groups = {g for gs in labdir.LAB_PEOPLE.values() for g in gs} | set(labdir.LAB_NESTED)
    assert set(labdir.LAB_MAPPINGS) <= groups
