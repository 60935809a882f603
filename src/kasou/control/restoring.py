"""The one step every restore into a new VM shares, whatever the source (a host's generation,
:mod:`kasou.control.backups`; the backup server's, :mod:`kasou.control.offsite`): each disk and the UEFI
variable store made by the source's agent call, the TPM's state beside the first disk, then the VM record
completed (stopped) and its ledger started. What was made is appended to ``made`` as it is made, so the
caller's undo removes it when anything fails."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from kasou.control.records import LedgerEvent
from kasou.model.firmware import VARS_ID
from kasou.model.spec import DiskSpec
from kasou.model.state import VMState

if TYPE_CHECKING:
    from kasou.agent.models import DiskInfo
    from kasou.control.base import VMControl
    from kasou.control.jobs import JobContext

DiskRestorer = Callable[[str], Awaitable["DiskInfo"]]  # a disk id -> what its agent made
TpmRestorer = Callable[[str], Awaitable[str | None]]  # the first disk's path -> the TPM state directory


async def restore_into(
    vms: VMControl, ctx: JobContext, new_name: str, host: str, disk_ids: list[str], disk: DiskRestorer,
    tpm: TpmRestorer | None, made: list[str], label: str, detail: str,
) -> None:  # fmt: skip
    disks: list[DiskSpec] = []
    nvram = tpm_state = None
    for i, disk_id in enumerate(disk_ids):
        await ctx.progress(0.1 + 0.8 * i / max(1, len(disk_ids)), f"{label} {disk_id}")
        info = await disk(disk_id)
        made.append(info.path)
        if disk_id == VARS_ID:
            nvram = info.path
        else:
            disks.append(DiskSpec(id=disk_id, size_bytes=info.size_bytes, format=info.format, path=info.path))
    if tpm is not None and disks and disks[0].path:
        await ctx.progress(0.9, "restoring the TPM's state")
        tpm_state = await tpm(disks[0].path)
        made += [tpm_state] if tpm_state else []
    await vms.records.set(new_name, state=VMState.STOPPED, disks=disks, nvram=nvram, tpm_state=tpm_state)
    await vms.ledger.record(new_name, LedgerEvent.DEFINED, host, detail)
