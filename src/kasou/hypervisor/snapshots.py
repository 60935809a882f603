"""Snapshots as external qcow2 overlays: what the agent and a driver exchange, and the offline image steps.

A VM's disk is a linear chain of qcow2 layers. Taking snapshot S of a disk
whose active layer is ``L`` makes an empty overlay ``O`` on top of ``L``; the
guest writes into ``O`` from then on, and ``L`` (with its backing chain) is the
snapshot's content, never written again while S exists::

    disk0.qcow2  <-  disk0.s1.qcow2  <-  disk0.s2.qcow2 (active)
    (S1's base)      (S1's overlay,       (S2's overlay)
                      S2's base)

* **Revert** to S: the overlay ``O`` is made anew, empty, on ``L`` (the VM does
  not run meanwhile); with a memory snapshot QEMU then starts from the saved
  RAM and device state (``-incoming``), so the guest goes on from that instant.
* **Delete** S: ``O`` is committed into ``L`` (``block-commit`` while the VM
  runs, ``qemu-img commit`` when it does not) and removed; the layer above
  ``O`` (if any) now rests on ``L``. Chains stay as long as the snapshots kept.

Running VMs are the driver's (:meth:`kasou.hypervisor.base.Driver.snapshot` and
``merge_snapshot``); for stopped VMs the agent uses the ``qemu-img`` steps below
(the tests' fake driver uses them too, to keep real files in functional tests).
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from kasou.errors import HypervisorError, OperationTimeout

QEMU_IMG_TIMEOUT = 600.0  # a commit of a large layer copies all its data


class SnapshotDiskNow(BaseModel):
    """One disk of a VM as the control plane knows it: its active (top) layer."""

    model_config = ConfigDict(extra="forbid")

    id: str
    path: str


class SnapshotLayers(BaseModel):
    """One disk of one snapshot: ``base`` is its content (frozen), ``overlay`` was made on top of it."""

    model_config = ConfigDict(extra="forbid")

    id: str
    base: str
    overlay: str


class SnapshotTake(BaseModel):
    """Body of the agent's ``POST /vms/{name}/snapshots``."""

    model_config = ConfigDict(extra="forbid")

    snapshot: str
    disks: list[SnapshotDiskNow]
    memory: bool = False  # also save the RAM and device state (a running VM only)


class SnapshotTaken(BaseModel):
    snapshot: str
    disks: list[SnapshotLayers]
    memory_path: str | None = None
    memory_bytes: int = 0
    size_bytes: int = 0  # allocated bytes of the frozen layers, plus the memory state
    live: bool = False  # taken from a running QEMU (else with qemu-img)
    paused_ms: int | None = None  # how long the guest's vCPUs stood still for it (live only)
    # application: the guest's file systems were frozen by its agent at the instant; crash: no agent answered
    # (as after a power cut); memory: the running state itself was saved; None: taken from a stopped VM
    consistency: Literal["application", "crash", "memory"] | None = None


class SnapshotMergeDisk(BaseModel):
    """Commit layer ``top`` into ``base`` (its backing file); ``child`` rests on ``top`` (None: top is active)."""

    model_config = ConfigDict(extra="forbid")

    id: str
    top: str
    base: str
    child: str | None = None


class SnapshotMerge(BaseModel):
    """Body of the agent's ``POST /vms/{name}/snapshots/merge``."""

    model_config = ConfigDict(extra="forbid")

    disks: list[SnapshotMergeDisk]
    timeout_s: float = Field(default=600.0, gt=0, le=86_400)


class SnapshotMerged(BaseModel):
    disks: dict[str, str]  # disk id -> its active layer after the merge
    live: bool = False
    base_bytes: dict[str, int] = {}  # disk id -> allocated bytes of the base after the merge


class SnapshotRevert(BaseModel):
    """Body of the agent's ``POST /vms/{name}/snapshots/revert``: the VM does not run."""

    model_config = ConfigDict(extra="forbid")

    disks: list[SnapshotLayers]  # each overlay is made anew, empty, on its base


class SnapshotRestore(BaseModel):
    """Body of the agent's ``POST /vms/{name}/restore``: start a VM from a saved memory state."""

    model_config = ConfigDict(extra="forbid")

    spec: Any  # a LaunchSpec (checked by the agent; kept untyped here to avoid an import cycle)
    state_path: str


def overlay_path(active: str, disk_id: str, snapshot: str) -> Path:
    """Where the overlay of ``snapshot`` goes: beside the disk's active layer."""
    return Path(active).parent / f"{disk_id}.{snapshot}.qcow2"


def memory_path(first_disk: str, snapshot: str) -> Path:
    return Path(first_disk).parent / f"{snapshot}.vmstate"


# -- qemu-img, for disks no QEMU has open ------------------------------------------------------


async def qemu_img(*args: str, timeout: float = QEMU_IMG_TIMEOUT) -> str:
    proc = await asyncio.create_subprocess_exec(
        "qemu-img", *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except BaseException:
        proc.kill()
        await proc.wait()
        raise OperationTimeout(f"qemu-img {args[0]} did not finish within {timeout:.0f} s") from None
    if proc.returncode != 0:
        lines = [ln for ln in err.decode(errors="replace").splitlines() if ln.strip()]
        msg = lines[-1].removeprefix("qemu-img: ") if lines else f"exit status {proc.returncode}"
        raise HypervisorError(f"qemu-img {args[0]} failed: {msg}")
    return out.decode()


async def image_info(path: str | Path) -> dict[str, Any]:
    """``qemu-img info`` of one layer (``-U``: also while a QEMU holds it)."""
    data: dict[str, Any] = json.loads(await qemu_img("info", "--output=json", "-U", str(path), timeout=30))
    return data


async def allocated(path: str | Path) -> int:
    try:
        return int((await image_info(path)).get("actual-size", 0))
    except HypervisorError:
        return 0


async def create_overlay(base: str | Path, overlay: str | Path, size_bytes: int | None = None) -> None:
    """An empty qcow2 overlay on ``base`` (``-u``: the base is not opened, so a running QEMU may hold it)."""
    if size_bytes is None:
        size_bytes = int((await image_info(base))["virtual-size"])
    await qemu_img("create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(base), "-u", str(overlay), str(size_bytes))


async def commit_offline(top: str | Path, base: str | Path, child: str | Path | None) -> None:
    """Commit ``top`` into its backing file ``base`` and put ``child`` (if any) on ``base``; ``top`` stays."""
    info = await image_info(top)
    backing = info.get("full-backing-filename") or info.get("backing-filename")
    if backing is None or Path(str(backing)).resolve() != Path(base).resolve():
        raise HypervisorError(f"{top} does not rest on {base} (its backing file is {backing}); the chain changed")
    await qemu_img("commit", "-q", "-d", str(top))
    if child is not None:
        # -u: the content of top is in base now, so the child's data stays the same
        await qemu_img("rebase", "-q", "-u", "-F", "qcow2", "-b", str(base), str(child), timeout=60)
