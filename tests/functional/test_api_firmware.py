"""Firmware and TPM through the API, with the fake driver and real files: the UEFI variable store (a copy of
the host's OVMF template) and the TPM's state (manufactured by swtpm_setup) beside the VM's disk; what a
bad combination says; linked clones; migration with local and shared disks; backups, restore and delete."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pytest

from kasou.hypervisor.qemu import firmware as fw
from tests.functional.conftest import Cluster, Env

OVMF = Path("/usr/share/OVMF")


def sha(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def permall(state: str | Path) -> bytes:
    return (Path(state) / "tpm2-00.permall").read_bytes()


def files_of(tmp: Path, vm: str) -> list[str]:
    """Every file and directory of VM ``vm`` under ``tmp`` (disks, variables, TPM state, backups)."""
    return sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*") if f"/{vm}/" in f"/{p.relative_to(tmp)}/")


def test_uefi_vm_with_a_tpm_has_its_own_files_beside_its_disk(env: Env) -> None:
    vm = env.create("emr", firmware="uefi", tpm=True, memory_mib=256)
    assert (vm["firmware"], vm["tpm"], vm["os"]) == ("uefi", True, None)
    home = Path(vm["disks"][0]["path"]).parent
    assert vm["nvram"] == str(home / "efivars.fd") and vm["tpm_state"] == str(home / "tpm")
    assert sha(vm["nvram"]) == sha(OVMF / "OVMF_VARS_4M.fd")
    assert len(permall(vm["tpm_state"])) > 1000  # manufactured: an endorsement key and its certificate
    assert env.act("emr", "start")["state"] == "succeeded"
    launched = env.driver.specs["emr"]
    assert (launched.firmware, launched.nvram, launched.tpm_state) == ("uefi", vm["nvram"], vm["tpm_state"])
    assert env.act("emr", "stop")["state"] == "succeeded"
    # Deleted with the VM: nothing of it is left.
    assert env.wait(env.api.delete("/v1/vms/emr").json()["job"])["state"] == "succeeded"
    assert not home.exists()


def test_windows_gets_secure_boot_a_tpm_and_its_os_type(env: Env) -> None:
    vm = env.create("win", os="windows", cpu="qemu64", memory_mib=256)
    assert (vm["firmware"], vm["tpm"], vm["os"]) == ("uefi-secure", True, "windows")
    assert sha(vm["nvram"]) == sha(OVMF / "OVMF_VARS_4M.ms.fd")  # Microsoft's keys enrolled
    env.act("win", "start")
    assert env.driver.specs["win"].os == "windows"


def test_combinations_that_cannot_work_change_nothing(env: Env) -> None:
    env.create("lab")
    before = (env.api.get("/v1/vms").json(), sorted(env.tmp.rglob("*")))
    cases: list[tuple[Any, int, str]] = [
        (env.api.post("/v1/vms", json={"name": "w", "image": "tiny", "os": "windows", "firmware": "bios"}), 422,
         "--os windows needs --firmware uefi-secure, not bios"),
        (env.api.post("/v1/vms", json={"name": "w", "image": "tiny", "os": "windows", "tpm": False}), 422,
         "--os windows needs a TPM"),
        (env.api.post("/v1/vms", json={"name": "w", "image": "tiny", "firmware": "efi"}), 422,
         "firmware must be one of bios, uefi, uefi-secure"),
        (env.api.post("/v1/vms", json={"name": "w", "image": "tiny", "firmware": "uefi", "storage": "replicated"}),
         422, "a replicated VM cannot have UEFI variables yet"),
        (env.api.post("/v1/vms", json={"name": "w", "image": "tiny", "firmware": "uefi"}), 422,
         "UEFI needs at least 256 MiB of memory, not 128"),
        (env.api.patch("/v1/vms/lab", json={"firmware": "uefi"}), 422, "firmware cannot change after a VM is created"),
        (env.api.patch("/v1/vms/lab", json={"tpm": True, "ha": True}), 422, "tpm cannot change"),
    ]  # fmt: skip
    for r, status, words in cases:
        assert r.status_code == status, r.text
        assert words in r.json()["message"], r.json()
    assert (env.api.get("/v1/vms").json(), sorted(env.tmp.rglob("*"))) == before


def test_a_failed_create_leaves_nothing(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(fw.VARS, "uefi", "OVMF_VARS_missing.fd")  # as a host without Debian's ovmf
    r = env.api.post(
        "/v1/vms", json={"name": "emr", "image": "tiny", "firmware": "uefi", "tpm": True, "memory_mib": 256}
    )
    job = env.wait(r.json()["job"])
    assert job["state"] == "failed"
    assert "the UEFI firmware is not installed on this host" in job["error"]["message"]
    assert "apt-get install ovmf" in job["error"]["message"]
    assert env.api.get("/v1/vms/emr").status_code == 404
    assert files_of(env.tmp, "emr") == []


def test_a_linked_clone_keeps_its_templates_variables_and_gets_a_tpm_of_its_own(env: Env) -> None:
    tpl = env.create("tpl", firmware="uefi-secure", tpm=True, memory_mib=256)
    Path(tpl["nvram"]).write_bytes(b"\x01" * Path(tpl["nvram"]).stat().st_size)  # boot entries were written
    assert env.api.post("/v1/vms/tpl/template").status_code == 200
    clone = env.create("c1", template="tpl", image=None, memory_mib=256)
    assert (clone["firmware"], clone["tpm"]) == ("uefi-secure", True)
    assert clone["nvram"] != tpl["nvram"] and sha(clone["nvram"]) == sha(tpl["nvram"])
    assert permall(clone["tpm_state"]) != permall(tpl["tpm_state"])  # a TPM is never cloned
    r = env.api.post("/v1/vms", json={"name": "c2", "template": "tpl", "firmware": "bios", "memory_mib": 256})
    assert r.status_code == 422 and "a linked clone has its template's firmware (tpl: uefi-secure)" in r.text


def test_backup_and_restore_carry_the_variables_and_the_tpm(env: Env) -> None:
    vm = env.create("pacs", firmware="uefi", tpm=True, memory_mib=256)
    Path(vm["nvram"]).write_bytes(b"\x07" * Path(vm["nvram"]).stat().st_size)
    job = env.wait(env.api.post("/v1/vms/pacs/backups", json={}).json()["job"])  # stopped: qemu-img
    assert job["state"] == "succeeded", job
    env.act("pacs", "start")
    job = env.wait(env.api.post("/v1/vms/pacs/backups", json={"incremental": True}).json()["job"])  # running
    assert job["state"] == "succeeded", job
    assert job["result"]["kind"] == "incremental"  # the variable store (always whole) does not make it full
    gens = env.api.get("/v1/vms/pacs/backups").json()
    assert [sorted(d["disk_id"] for d in g["disks"]) for g in gens] == [["disk0", "efivars"]] * 2
    job = env.wait(env.api.post("/v1/vms/pacs/backups/2/restore", json={"as": "pacs-r"}).json()["job"])
    assert job["state"] == "succeeded", job
    r = env.api.get("/v1/vms/pacs-r").json()
    assert (r["firmware"], r["tpm"]) == ("uefi", True)
    assert Path(r["nvram"]).name == "efivars.fd" and Path(r["nvram"]).parent == Path(r["disks"][0]["path"]).parent
    assert sha(r["nvram"]) == sha(vm["nvram"])
    assert permall(r["tpm_state"]) == permall(vm["tpm_state"])  # the same TPM: sealed secrets still open
    # Retention drops the oldest generation's TPM copy too.
    tars = sorted((env.tmp / "backups" / "pacs" / "tpm").glob("*.tar"))
    assert len(tars) == 2
    assert env.api.patch("/v1/vms/pacs/backup-policy", json={"keep": 1}).status_code == 200
    env.wait(env.api.post("/v1/vms/pacs/backups", json={}).json()["job"])
    assert len(list((env.tmp / "backups" / "pacs" / "tpm").glob("*.tar"))) == 1


def test_a_damaged_tpm_backup_is_refused_and_nothing_is_made(env: Env) -> None:
    env.create("ris", tpm=True)
    env.wait(env.api.post("/v1/vms/ris/backups", json={}).json()["job"])
    (tar,) = (env.tmp / "backups" / "ris" / "tpm").glob("*.tar")
    data = bytearray(tar.read_bytes())
    data[600] ^= 0xFF  # a bit of the state itself (the header is 512 bytes)
    tar.write_bytes(bytes(data))
    job = env.wait(env.api.post("/v1/vms/ris/backups/1/restore", json={"as": "ris-r"}).json()["job"])
    assert job["state"] == "failed" and "does not hold what was backed up" in job["error"]["message"]
    assert env.api.get("/v1/vms/ris-r").status_code == 404 and files_of(env.tmp / "disks", "ris-r") == []


@pytest.mark.parametrize("storage", ["local", "shared"])
def test_migration_moves_the_variables_and_the_tpm_state(cluster: Cluster, storage: str) -> None:
    vm = cluster.create("emr", firmware="uefi", tpm=True, storage=storage, start=True, memory_mib=256)
    source = vm["host"]
    target = next(h for h in ("h1", "h2", "h3") if h != source)
    job = cluster.wait(cluster.api.post("/v1/vms/emr/migrate", json={"to": target}).json()["job"])
    assert job["state"] == "succeeded", job["error"]
    after = cluster.api.get("/v1/vms/emr").json()
    assert after["host"] == target
    launched = cluster.drivers[target].specs["emr"]
    assert (launched.nvram, launched.tpm_state) == (after["nvram"], after["tpm_state"])
    assert Path(after["tpm_state"]).name == "tpm-2" and Path(after["tpm_state"]).is_dir()
    assert not Path(vm["tpm_state"]).exists()  # the old directory went with the source's copy
    if storage == "shared":
        assert after["nvram"] == vm["nvram"] and Path(after["nvram"]).exists()  # one file every host sees
    else:
        assert Path(after["nvram"]).name == "efivars-2.fd" and f"/{target}/" in after["nvram"]
        assert not Path(vm["nvram"]).exists()
    # And back again: the names alternate.
    job = cluster.wait(cluster.api.post("/v1/vms/emr/migrate", json={"to": source}).json()["job"])
    assert job["state"] == "succeeded", job
    back = cluster.api.get("/v1/vms/emr").json()
    assert Path(back["tpm_state"]).name == "tpm" and Path(back["tpm_state"]).is_dir()
