"""The public view of a VM (``GET /v1/vms``, ``vm show``): a pure function of its record and its host's report."""

from __future__ import annotations

from kasou.control.base import DiskView, GuestView, ReplicaView, VMView
from kasou.control.records import VMRecord
from kasou.hypervisor.base import RuntimeInfo, RuntimeState
from kasou.model import cloudinit
from kasou.model.state import ACTIVE_STATES, VMState


def vm_view(rec: VMRecord, rt: RuntimeInfo | None, reachable: bool, blocked: str | None) -> VMView:
    """What the API shows of a VM: its record, what its host's agent reports (``rt``; None: not running there, or
    ``reachable`` False: the host does not answer, so an active VM's state is unknown), and why HA would not
    restart it now (``blocked``)."""
    live = rt is not None and rt.state in (
        RuntimeState.RUNNING,
        RuntimeState.PAUSED,
        RuntimeState.SHUTTING_DOWN,
    )
    active = rec.state in ACTIVE_STATES
    return VMView(
        name=rec.name,
        uuid=rec.uuid,
        state=rec.state if reachable or not active else VMState.UNKNOWN,  # its host does not answer
        host=rec.host,
        vcpus=rec.vcpus,
        memory_mib=rec.memory_mib,
        image=rec.image,
        cpu=rec.cpu,
        machine=rec.machine,
        firmware=rec.firmware,
        tpm=rec.tpm_state is not None,
        os=rec.os,
        nvram=rec.nvram,
        tpm_state=rec.tpm_state,
        template=rec.template,
        cdrom_drive=rec.cdrom_drive,
        cdrom=rec.cdrom,
        boot=rec.boot,
        description=rec.description,
        department=rec.department,
        criticality=rec.criticality,
        anti_affinity=rec.anti_affinity,
        ha=rec.ha,
        priority=rec.priority,
        startup=rec.startup,
        tags=rec.tags,
        cloud_init=cloudinit.summary(rec.cloud_init),
        ha_armed=rec.ha_armed and active and blocked is None,
        ha_blocked=blocked,
        storage="replicated" if rec.replicated else ("shared" if rec.disks and rec.disks[0].shared else "local"),
        replica=ReplicaView(host=rec.replica.host, state=rec.replica.state, since=rec.replica.since)
        if rec.replica is not None
        else None,
        disks=[
            DiskView(
                id=d.id,
                size_bytes=d.size_bytes,
                format=d.format,
                path=d.path,
                backing=d.backing,
                linked=d.linked,
                shared=d.shared,
                pool=d.pool,
                mirror=d.mirror,
                port=d.port,
            )
            for d in rec.disks
        ],
        nics=rec.nics,
        next_start=rec.next_start,
        guest_ready=bool(live and rt and rt.guest_ready),
        uptime_s=rt.guest_uptime_s if live and rt else None,
        heartbeat_age_s=rt.heartbeat_age_s if live and rt else None,
        guest=GuestView.model_validate(rt.guest.model_dump()) if live and rt else GuestView(),
        accelerator=rt.accelerator if live and rt else None,
        started_at=rec.started_at if rec.state in ACTIVE_STATES else None,
        created_at=rec.created_at,
        state_since=rec.state_since,
        job=rec.job,
        last_error=rec.last_error,
        host_reachable=reachable,
    )
