"""The site's backup server: where every generation is copied after it is made, and restores from there.

Record (``backup-server`` in the store): the server's URL, its certificate's fingerprint (pinned), a **writer**
token it issued, and the site's backup **public** key (``kasou backup key create`` makes the pair on the
operator's machine and prints the private part once, on paper). The token and the key's id secret are
sealed with the site's secrets key. Nothing here can decrypt a backup: a restore from the server is given the
private key by the operator, for its length only (docs/backup-server.md).

After each local generation is recorded (:mod:`kasou.control.backups`), its host's agent copies it to the
server: an incremental whose previous generation the server holds reads and sends only changed chunks, and
the server deduplicates the rest. A copy that fails leaves the local generation good and raises a
``backup_offsite_failed`` event; the generation's record says what the server holds (``offsite``).
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict

from kasou.agent.models import BackupSend, DiskInfo, OffsiteDisk, OffsiteFile, OffsiteRestore, VaultTarget
from kasou.control import scheduler
from kasou.control.records import JobRecord, VMRecord, vm_key
from kasou.control.restoring import restore_into
from kasou.control.sealed import Sealer, default_key_path
from kasou.control.vm_create import place_new
from kasou.errors import AlreadyExists, InvalidSpec, KasouError, NotFound, StoreConflict, WrongState
from kasou.model.firmware import VARS_ID
from kasou.model.spec import NicSpec, random_mac, validate_name
from kasou.model.state import VMState
from kasou.vault import client as vault
from kasou.vault.crypt import BackupKey, PublicBackupKey

if TYPE_CHECKING:
    from kasou.control.base import VMControl, VMView
    from kasou.control.jobs import JobContext

KEY = "backup-server"
ASK_S = 20.0  # how long a listing (backup list, backup status) waits for the backup server's answer


class OffsiteSet(BaseModel):
    """Body of ``PUT /v1/backup-server``."""

    model_config = ConfigDict(extra="forbid")

    url: str
    token: str  # a writer token of the backup server (``kasou backup-server client add NAME --role writer``)
    fingerprint: str | None = None  # its certificate's SHA-256 (``kasou backup-server show``); required for https
    public_key: dict[str, Any]  # the site's backup public key (``kasou backup key create``)


class OffsiteRecord(BaseModel):
    url: str
    token: str  # sealed
    fingerprint: str | None
    public_key: str  # sealed JSON (its id secret keys the chunk ids)
    key_fingerprint: str
    server_id: str = ""
    set_at: float
    isolated: bool = False  # kasou backup isolate: no host reaches the server until --rejoin
    role: str = "writer"  # the token's role on the server: a reader's serves restores and drills only


class OffsiteView(BaseModel):
    url: str
    fingerprint: str | None
    key_fingerprint: str  # the backup key every copy is encrypted to
    server_id: str
    set_at: float
    isolated: bool = False
    role: str = "writer"  # reader: restores and drills only, nothing is copied there (a second site)


class RestorePlanItem(BaseModel):
    vm: str
    generation: int
    created: float  # the point in time it holds
    received: float  # when the backup server got it
    locked_until: float | None
    priority: int  # the VM's HA priority when it was backed up: restored first when highest
    vcpus: int
    memory_mib: int
    bytes_logical: int


class RestorePlanRequest(BaseModel):
    """Body of ``POST /v1/backup-server/restore-plan``."""

    model_config = ConfigDict(extra="forbid")

    key: dict[str, Any]  # the backup key's private part, for this request only
    before: float | None = None  # only generations the server received before this time (an attack's start)
    vms: list[str] | None = None  # only these names (default: every VM the server holds)


class OffsiteCopy(BaseModel):
    """What the backup server holds of a generation (in its :class:`BackupRecord`)."""

    generation: int
    sent_at: float
    seconds: float
    bytes_logical: int
    bytes_read: int
    bytes_sent: int
    incremental: bool
    locked_until: float | None
    key_fingerprint: str


def _received(g: dict[str, Any]) -> float:
    """When the first backup server got the generation (a second site's copy carries its primary's time)."""
    synced = g.get("synced_from") or {}
    first = synced.get("received") if isinstance(synced, dict) else None
    return float(first if isinstance(first, (int, float)) else g["received"])


def _key(key_json: dict[str, Any]) -> BackupKey:
    try:
        return BackupKey.from_json(key_json)
    except (ValueError, KeyError, TypeError) as e:
        raise InvalidSpec(f"the backup key does not read: {e}", field="key") from None


def _what(field: str) -> str:
    return f"backup-server/{field}"


class Offsite:
    def __init__(self, vms: VMControl, sealer: Sealer | None = None) -> None:
        self.vms = vms
        self.sealer = sealer or Sealer(default_key_path(vms.store))

    async def _record(self) -> OffsiteRecord | None:
        got = await self.vms.store.get(KEY)
        return None if got is None else OffsiteRecord.model_validate(got.value)

    def _view(self, r: OffsiteRecord) -> OffsiteView:
        return OffsiteView(url=r.url, fingerprint=r.fingerprint, key_fingerprint=r.key_fingerprint,
                           server_id=r.server_id, set_at=r.set_at, isolated=r.isolated, role=r.role)  # fmt: skip

    async def get(self) -> OffsiteView | None:
        r = await self._record()
        return None if r is None else self._view(r)

    async def set(self, req: OffsiteSet) -> OffsiteView:
        """Checked before it is kept: the key reads, the server answers with its pinned certificate and the token."""
        try:
            pub = PublicBackupKey.from_json(req.public_key)
        except (ValueError, KeyError, TypeError) as e:
            raise InvalidSpec(f"the backup public key does not read: {e}", field="public_key") from None
        target = VaultTarget(url=req.url, token=req.token, fingerprint=req.fingerprint)

        def probe() -> dict[str, Any]:
            with vault.VaultClient(target.url, target.token, fingerprint=target.fingerprint, timeout=15) as c:
                info = c.info()
                c.missing([])  # the token is one the server knows
                return info

        info = await asyncio.to_thread(probe)
        rec = OffsiteRecord(
            url=req.url, token=self.sealer.seal(req.token, _what("token")), fingerprint=req.fingerprint,
            public_key=self.sealer.seal(pub.to_json(), _what("public_key")), key_fingerprint=pub.fingerprint,
            server_id=str(info.get("server_id", "")), set_at=time.time(), role=str(info.get("role", "writer")),
        )  # fmt: skip
        await self.vms.store.put(KEY, rec.model_dump(mode="json"))
        if rec.role == "reader":
            await self.vms.events.emit("backup_server_set", "site", f"the backup server at {req.url} is set with a "
                                       "reader token: restores and drills read it; no backup is copied there",
                                       "warning")  # fmt: skip
        else:
            await self.vms.events.emit("backup_server_set", "site", f"backups are copied to the backup server at "
                                       f"{req.url}, encrypted to key {pub.fingerprint}", "info")  # fmt: skip
        return self._view(rec)

    async def clear(self) -> bool:
        r = await self._record()
        if r is None:
            return False
        await self.vms.store.delete(KEY)
        await self.vms.events.emit("backup_server_removed", "site", f"backups are no longer copied to {r.url}: "
                                   "only the hosts' own generations remain", "warning")  # fmt: skip
        return True

    async def isolate(self, on: bool) -> OffsiteView:
        """Stop (or let again) every host reaching the backup server: copies and restores wait for --rejoin."""
        r = await self._record()
        if r is None:
            raise WrongState("no backup server is set")
        r = r.model_copy(update={"isolated": on})
        await self.vms.store.put(KEY, r.model_dump(mode="json"))
        msg = (f"the hosts are cut off from the backup server {r.url} (kasou backup isolate); on the backup server "
               "itself, kasou backup-server isolate refuses every client" if on else
               f"the hosts reach the backup server {r.url} again")  # fmt: skip
        await self.vms.events.emit("backup_server_isolated" if on else "backup_server_rejoined", "site", msg,
                                   "warning" if on else "info")  # fmt: skip
        return self._view(r)

    async def target(self) -> tuple[VaultTarget, dict[str, Any]] | None:
        r = await self._record()
        if r is None:
            return None
        if r.isolated:
            raise WrongState(f"the backup server {r.url} is isolated from the hosts (kasou backup isolate --rejoin)")
        t = VaultTarget(url=r.url, token=self.sealer.open(r.token, _what("token")), fingerprint=r.fingerprint)
        return t, json.loads(self.sealer.open(r.public_key, _what("public_key")))

    async def _needed(self) -> VaultTarget:
        got = await self.target()
        if got is None:
            raise WrongState("no backup server is set: kasou backup server set --url URL --token T --fingerprint F "
                             "--public-key FILE")  # fmt: skip
        return got[0]

    async def generations(self, vm: str) -> list[dict[str, Any]]:
        """What the backup server lists for the name (its locks and verification included)."""
        validate_name(vm)
        t = await self._needed()

        def listing() -> list[dict[str, Any]]:
            with vault.VaultClient(t.url, t.token, fingerprint=t.fingerprint) as c:
                return c.list_generations(vm)

        return sorted(await asyncio.to_thread(listing), key=lambda g: int(g["generation"]))

    async def held(self, vm: str | None = None) -> tuple[list[dict[str, Any]], str | None]:
        """What the backup server lists (of ``vm``, else of every VM), asked within ``ASK_S``: ``(listing, None)``,
        or ``([], why)`` when it could not be asked; ``([], None)`` when no backup server is set."""
        if await self._record() is None:
            return [], None
        try:
            listed = await asyncio.wait_for(self.generations(vm) if vm else self.everything(), ASK_S)
        except (KasouError, TimeoutError, OSError) as e:
            why = e.message if isinstance(e, KasouError) else f"no answer in {ASK_S:.0f} s ({type(e).__name__})"
            return [], f"the backup server could not be asked: {why}"
        return listed, None

    async def everything(self) -> list[dict[str, Any]]:
        """Every generation the backup server lists, of every VM (its locks, verification, second sites)."""
        t = await self._needed()

        def listing() -> list[dict[str, Any]]:
            with vault.VaultClient(t.url, t.token, fingerprint=t.fingerprint) as c:
                return c.list_all()

        return await asyncio.to_thread(listing)

    # -- a copy of a new generation (called by kasou.control.backups with the VM's lock held) -------------

    async def send(self, rec: VMRecord, backup: Any, previous: Any | None) -> OffsiteCopy | None:
        """Copy ``backup`` (a BackupRecord just recorded) to the server; None when no server is set."""
        r = await self._record()
        if r is not None and r.role == "reader":
            raise WrongState(f"the backup server {r.url} is set with a reader token (restores only): give a writer "
                             "token with kasou backup server set to copy backups there")  # fmt: skip
        got = await self.target()
        if got is None:
            return None
        server, public_key = got
        prev_files = {d.path: previous.generation for d in previous.disks} if previous is not None else {}
        disks = [OffsiteDisk(disk_id=d.disk_id, path=d.path, format="raw" if d.disk_id == VARS_ID else "qcow2",
                             incremental_of=prev_files.get(d.backing) if d.backing else None)
                 for d in backup.disks]  # fmt: skip
        config = {"record": backup.model_dump(mode="json", exclude={"offsite", "disks"}),
                  "digests": {d.disk_id: d.digest for d in backup.disks},
                  "vm": {"priority": rec.priority, "ha": rec.ha}}  # fmt: skip
        req = BackupSend(server=server, public_key=public_key, vm_uuid=rec.uuid, generation=backup.generation,
                         created=backup.created_at, disks=disks, config=config,
                         tpm_path=backup.tpm.path if backup.tpm is not None else None)  # fmt: skip
        sent = await self.vms.agents.get(backup.host).send_backup(rec.name, req)
        return OffsiteCopy(generation=sent.generation, sent_at=time.time(), seconds=sent.seconds,
                           bytes_logical=sent.bytes_logical, bytes_read=sent.bytes_read, bytes_sent=sent.bytes_sent,
                           incremental=sent.incremental, locked_until=sent.locked_until,
                           key_fingerprint=sent.key_fingerprint)  # fmt: skip

    # -- restore from the server -----------------------------------------------------------------------

    async def read_file(
        self, vm: str, generation: int, path: str, key_json: dict[str, Any], disk: str | None = None
    ) -> bytes:
        """One file of the generation's disk, read on a host that is up (its agent restores the disk to scratch
        and mounts its file systems read-only), with the operator's key."""
        validate_name(vm)
        _key(key_json)
        server = await self._needed()
        hosts = sorted(self.vms.agents.names())
        if not hosts:
            raise WrongState("no host is up to read the backup on")
        req = OffsiteFile(server=server, key=key_json, source_vm=vm, generation=generation, disk_id=disk, path=path)
        return await self.vms.agents.get(hosts[0]).offsite_file(req)

    async def plan(
        self, key_json: dict[str, Any], before: float | None = None, names: list[str] | None = None
    ) -> list[RestorePlanItem]:
        """What bringing every VM back from the server restores, in order: for each VM name the server holds (or
        each of ``names``), its newest generation received before ``before`` (a time before an attack: later
        generations may hold encrypted disks); highest HA priority first, then the name."""
        key = _key(key_json)
        server = await self._needed()
        for n in names or []:
            validate_name(n)

        def gather() -> list[RestorePlanItem]:
            out = []
            with vault.VaultClient(server.url, server.token, fingerprint=server.fingerprint) as c:
                listed = c.list_all()
                for vm in sorted({str(g["vm"]) for g in listed} if names is None else set(names)):
                    fit = [g for g in listed if g["vm"] == vm and (before is None or _received(g) < before)]
                    if not fit:
                        raise NotFound(f"the backup server holds no generation of {vm!r}"
                                       + (" from before that time" if before is not None else ""))  # fmt: skip
                    g = max(fit, key=lambda x: int(x["generation"]))
                    index = c.get_generation(vm, int(g["generation"]))
                    config = vault.restore_config(c, key, index)
                    rec = dict(config.get("record", {}))
                    out.append(RestorePlanItem(
                        vm=vm, generation=int(g["generation"]), created=float(index["created"]),
                        received=_received(g), locked_until=g.get("locked_until"),
                        priority=int(dict(config.get("vm", {})).get("priority", 50)),
                        vcpus=int(rec.get("vcpus", 1)), memory_mib=int(rec.get("memory_mib", 512)),
                        bytes_logical=int(index.get("bytes_logical", 0)),
                    ))  # fmt: skip
            return sorted(out, key=lambda i: (-i.priority, i.vm))

        return await asyncio.to_thread(gather)

    async def restore(
        self,
        vm: str,
        generation: int,
        new_name: str,
        key_json: dict[str, Any],
        host: str | None = None,
        network: str | None = None,
    ) -> tuple[VMView, JobRecord]:
        """A new (stopped) VM from the server's generation, opened with the operator's private key (a job).

        Works with no record of the VM here (a site rebuilt after an attack): the settings come sealed with the
        generation. Bad input (no such generation, the wrong key) is refused before anything is made. ``network``:
        every NIC on that network instead of the generation's (a restore drill's isolated network)."""
        validate_name(vm)
        validate_name(new_name)
        key = _key(key_json)
        server = await self._needed()

        def opened() -> tuple[dict[str, Any], dict[str, Any]]:
            with vault.VaultClient(server.url, server.token, fingerprint=server.fingerprint) as c:
                index = c.get_generation(vm, generation)
                return index, vault.restore_config(c, key, index)

        index, config = await asyncio.to_thread(opened)
        src = dict(config.get("record", {}))
        await self.vms.check_name_free(new_name, src.get("department"), None)
        loads = await self.vms.host_loads()
        if host is None:
            memory, vcpus = int(src.get("memory_mib", 512)), int(src.get("vcpus", 1))
            host = await place_new(self.vms, scheduler.Request(new_name, memory, vcpus, None), loads, start=True)
        elif host not in {h.name for h in loads}:
            raise NotFound(f"no host named {host!r} is up")
        job_id = self.vms.new_job_id()
        nics = [NicSpec.model_validate(n).model_copy(update={"mac": random_mac()}) for n in src.get("nics", [])]
        if network is not None:  # every NIC on this (isolated) network instead: a drill's copy
            iso = await self.vms.networks.is_isolated(network)
            nics = [n.model_copy(update={"network": network, "vlan": None, "isolated": iso}) for n in nics]
        rec = VMRecord(
            name=new_name, uuid=str(uuid.uuid4()), vcpus=int(src.get("vcpus", 1)),
            memory_mib=int(src.get("memory_mib", 512)), image=src.get("image"),
            description=f"restored from the backup server's generation {generation} of VM {vm}",
            nics=nics, department=src.get("department"), cpu=src.get("cpu"), machine=src.get("machine"),
            firmware=src.get("firmware", "bios"), os=src.get("os"), state=VMState.CREATING, host=host, job=job_id,
            priority=int(dict(config.get("vm", {})).get("priority", 50)),
        )  # fmt: skip
        try:
            await self.vms.store.create(vm_key(new_name), rec.model_dump(mode="json"))
        except StoreConflict:
            raise AlreadyExists(f"a VM named {new_name!r} already exists") from None
        disk_ids = [str(d["disk_id"]) for d in index.get("disks", [])]

        async def run(ctx: JobContext) -> dict[str, Any]:
            made: list[str] = []
            agent = self.vms.agents.get(host)

            def req(**kw: Any) -> OffsiteRestore:
                return OffsiteRestore(server=server, key=key_json, source_vm=vm, generation=generation, vm=new_name,
                                      **kw)  # fmt: skip

            async def disk(disk_id: str) -> DiskInfo:
                return await agent.restore_offsite(
                    req(disk_id=disk_id, format="raw" if disk_id == VARS_ID else "qcow2")
                )

            async def tpm(beside: str) -> str | None:
                return (await agent.restore_offsite_tpm(req(beside=beside))).tpm_state

            detail = f"restored from the backup server's generation {generation} of VM {vm}"
            try:
                await restore_into(self.vms, ctx, new_name, host, disk_ids, disk, tpm if "tpm_tar" in config else None,
                                   made, "restoring from the backup server:", detail)  # fmt: skip
                return {"vm": new_name, "from": vm, "generation": generation, "host": host, "source": "backup server"}
            except BaseException:
                await self.vms.undo_create(new_name, host, made)
                raise

        job = await self.vms.runner.submit("restore", new_name, run, job_id)
        return self.vms.view(rec, None, True), job
