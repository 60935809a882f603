"""A VM's cloud-init NoCloud seed: a small ISO 9660 disk labelled ``cidata``, made at each start.

Written into the VM's runtime directory from its :class:`kasou.model.cloudinit.CloudInit` (so a start,
a restart elsewhere and a migration's destination all make the same seed, and there is no file to
carry), by ``xorriso`` (Debian's ``xorriso``), bounded in time. QEMU gets it as a read-only virtio disk
(:func:`qemu_args`), which it never migrates: both ends of a migration have their own.
"""

from __future__ import annotations

import subprocess
import tempfile
from pathlib import Path

from kasou.errors import HypervisorError
from kasou.model import cloudinit as ci_model
from kasou.model.cloudinit import CloudInit
from kasou.model.spec import NicSpec

XORRISO_TIMEOUT_S = 60.0
NODE = "cidata"  # its block node and device id


def make_seed(path: Path, ci: CloudInit, vm: str, instance_id: str, nics: list[NicSpec]) -> None:
    """Write the seed ISO at ``path`` (replacing one there); HypervisorError with xorriso's reason if it fails."""
    with tempfile.TemporaryDirectory(prefix="kasou-seed-") as tmp:
        root = Path(tmp)
        (root / "meta-data").write_text(ci_model.meta_data(ci, vm, instance_id))
        (root / "user-data").write_text(ci_model.user_data(ci))
        files = ["meta-data", "user-data"]
        net = ci_model.network_config(ci, nics[0].mac if nics else None)
        if net is not None:
            (root / "network-config").write_text(net)
            files.append("network-config")
        path.unlink(missing_ok=True)
        argv = ["xorriso", "-as", "mkisofs", "-quiet", "-output", str(path), "-volid", "cidata", "-joliet", "-rock",
                *files]  # fmt: skip
        try:
            r = subprocess.run(argv, cwd=root, capture_output=True, text=True, timeout=XORRISO_TIMEOUT_S)
        except FileNotFoundError:
            raise HypervisorError("cannot make the cloud-init seed: xorriso is not installed (apt-get install "
                                  "xorriso)") from None  # fmt: skip
        except subprocess.TimeoutExpired:
            path.unlink(missing_ok=True)
            raise HypervisorError(f"cannot make the cloud-init seed of VM {vm!r}: xorriso took over "
                                  f"{XORRISO_TIMEOUT_S:.0f} s") from None  # fmt: skip
        if r.returncode != 0:
            path.unlink(missing_ok=True)
            last = (r.stderr.strip().splitlines() or ["no reason given"])[-1]
            raise HypervisorError(f"cannot make the cloud-init seed of VM {vm!r}: {last}")


def qemu_args(path: Path) -> list[str]:
    """The seed as a read-only virtio disk (not in the VM's disks: nothing copies, snapshots or backs it up)."""
    value = str(path).replace(",", ",,")
    return [
        "-blockdev", f"driver=file,filename={value},node-name={NODE}-file,read-only=on",
        "-blockdev", f"driver=raw,file={NODE}-file,node-name={NODE},read-only=on",
        "-device", f"virtio-blk-pci,drive={NODE},id={NODE}-dev",
    ]  # fmt: skip
