"""Which QEMU block node is which: a disk's current top node and its chain of qcow2 layers.

The driver opens disk ``D`` as nodes ``D-file`` (file) and ``D`` (qcow2) under
device ``D-dev`` (:mod:`kasou.hypervisor.qemu.cmdline`). Once a snapshot put an
overlay on it, or a commit pivoted it, the device's active node has another name:
so the device is found by its qdev path in ``query-block`` and the layers below
by file name in ``query-named-block-nodes``. Pure functions over QMP answers, plus
two thin readers.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kasou.errors import HypervisorError
from kasou.hypervisor.qemu.migration import Execute
from kasou.model.firmware import VARS_ID


def device_id(disk_id: str) -> str:
    return f"{disk_id}-dev"


def _is_device(entry: dict[str, Any], disk_id: str) -> bool:
    """``qdev`` is ``/machine/peripheral/D-dev/virtio-backend`` (or the bare id on some devices); the UEFI
    variable store is the machine's second flash chip, ``/machine/system.flash1``."""
    qdev = str(entry.get("qdev") or "")
    if disk_id == VARS_ID:
        return qdev.rstrip("/").endswith("system.flash1")
    parts = [p for p in qdev.split("/") if p]
    return qdev == device_id(disk_id) or (
        len(parts) >= 3 and parts[1] == "peripheral" and parts[2] == device_id(disk_id)
    )


def top_of(blocks: Iterable[dict[str, Any]], disk_id: str) -> dict[str, Any]:
    """The ``inserted`` part of the disk's ``query-block`` entry: ``node-name``, ``file``, ``image``."""
    for entry in blocks:
        if _is_device(entry, disk_id):
            inserted = entry.get("inserted")
            if not isinstance(inserted, dict) or not inserted.get("node-name"):
                raise HypervisorError(f"disk {disk_id} has no medium in QEMU")
            return inserted
    raise HypervisorError(f"QEMU has no device {device_id(disk_id)} for disk {disk_id}")


@dataclass(frozen=True)
class Layer:
    node: str  # the qcow2 (format) node
    path: str  # its file
    file_node: str | None  # the node of the file under it, if it has a name of its own
    backing: str | None  # the backing file's path
    virtual_size: int
    allocated: int


def layers(nodes: Iterable[dict[str, Any]]) -> dict[str, Layer]:
    """Every format node by its file's path (from ``query-named-block-nodes`` with ``flat``)."""
    all_nodes = list(nodes)
    file_nodes = {str(n.get("file")): str(n["node-name"]) for n in all_nodes if n.get("drv") == "file"}
    out = {}
    for n in all_nodes:
        if n.get("drv") == "file" or not n.get("node-name"):
            continue
        path = str(n.get("file"))
        image = n.get("image") if isinstance(n.get("image"), dict) else {}
        assert isinstance(image, dict)
        backing = n.get("backing_file")
        out[path] = Layer(
            node=str(n["node-name"]),
            path=path,
            file_node=file_nodes.get(path),
            backing=str(backing) if backing else None,
            virtual_size=int(image.get("virtual-size", 0)),
            allocated=int(image.get("actual-size", 0)),
        )
    return out


def chain_of(top: dict[str, Any]) -> list[str]:
    """The files of a disk's chain, top first, from its ``inserted`` entry (``image`` / ``backing-image``)."""
    out = []
    image: Any = top.get("image")
    while isinstance(image, dict):
        out.append(str(image.get("filename")))
        image = image.get("backing-image")
    return out


def same_file(a: str | None, b: str | None) -> bool:
    return a is not None and b is not None and Path(a).resolve() == Path(b).resolve()


async def top_node(execute: Execute, disk_id: str) -> dict[str, Any]:
    """The disk's active node now (``node-name``, ``file``, ``image``), found by its device."""
    return top_of(await execute("query-block", None), disk_id)


async def named_layers(execute: Execute) -> dict[str, Layer]:
    return layers(await execute("query-named-block-nodes", {"flat": True}))
