"""Start of a real OS: the debian image, create+start → the writer's first ``seq`` and the guest agent's answer.

Side by side in one run, interleaved, with the same guest on the same kind of disk (a thin qcow2 overlay on
the image, as ``vm create --image`` makes it), the same memory (512 MiB) and vCPU:

  (a) kasou: ``POST /v1/vms`` with ``start`` (overlay + QEMU start through the agent, confined);
  (b) bare QEMU: the same ``qemu-img create`` and the command line kasou builds (``build_argv``), run directly
      with ``-daemonize`` as root (no confinement);
  (c) libvirt: ``virsh create`` of the same guest (disk boot, the guest agent's channel), if libvirt works here.

Two moments each: the writer's first ``seq`` line on the serial console, and the first answer of the QEMU
guest agent inside the guest to ``guest-ping`` on its virtio-serial channel (bare and libvirt: a direct
ping on the channel's socket; kasou: ``vm show``'s ``guest.agent``, polled through the API, which adds up
to its poll interval).

    .venv/bin/python bench/start_debian.py [--runs 5] [--no-libvirt]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import images_dir, interleave, kasou_env, kill_pids, median, qemu_pids, wait_line
from kasou.hypervisor.base import LaunchDisk, LaunchSpec
from kasou.hypervisor.qemu.accel import decide
from kasou.hypervisor.qemu.cmdline import RuntimeFiles, build_argv
from kasou.image import load_image
from start_latency import Libvirt

MEMORY_MIB = 512
TIMEOUT = 600.0
SEQ = "seq "


def agent_answers(sock: Path, deadline: float) -> float:
    """Ping the guest agent on its channel's unix socket until it answers; the monotonic time it did."""
    while time.monotonic() < deadline:
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(1.0)
                s.connect(str(sock))
                token = int(time.monotonic() * 1000) % 2**31
                s.sendall(
                    b"\xff" + json.dumps({"execute": "guest-sync-delimited", "arguments": {"id": token}}).encode()
                )
                buf = b""
                t_end = time.monotonic() + 2.0
                while time.monotonic() < t_end and str(token).encode() not in buf:
                    try:
                        chunk = s.recv(4096)
                    except TimeoutError:
                        break
                    if not chunk:
                        break
                    buf += chunk
                if str(token).encode() in buf:
                    s.sendall(b'{"execute": "guest-ping"}\n')
                    reply = s.recv(4096)
                    if b'"return"' in reply:
                        return time.monotonic()
        except OSError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"the guest agent on {sock} did not answer")


def wait_seq(log: Path, deadline: float) -> float:
    return wait_line(log, SEQ, max(1.0, deadline - time.monotonic()), poll=0.05)


class Bare:
    def __init__(self, accelerator: str) -> None:
        self.art = load_image(images_dir(), "debian")
        self.accel = accelerator
        self.dir = Path(tempfile.mkdtemp(prefix="kasou-bared-", dir="/tmp"))

    def create_start(self, i: int) -> tuple[float, float]:
        name = f"bd{i}"
        t0 = time.monotonic()
        disk = self.dir / f"{name}.qcow2"
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", self.art.disk_format, "-b",
                        str(self.art.disk), str(disk)], check=True, timeout=60)  # fmt: skip
        files = RuntimeFiles(dir=self.dir / name, serial_log=self.dir / f"{name}.log")
        files.dir.mkdir()
        spec = LaunchSpec(name=name, uuid=str(uuid.uuid4()), vcpus=1, memory_mib=MEMORY_MIB, image=None,
                          cpu="x86-64-v2-AES", machine="pc-q35-7.2", disks=[LaunchDisk(id="disk0", path=str(disk))])  # fmt: skip
        argv = build_argv(spec, files, self.accel, None)
        subprocess.run([*argv, "-daemonize"], check=True, capture_output=True, timeout=60)
        deadline = t0 + TIMEOUT
        try:
            seq = wait_seq(files.serial_log, deadline) - t0
            qga = getattr(files, "qga", files.dir / "qga.sock")
            agent = agent_answers(qga, deadline) - t0
            return seq, agent
        finally:
            kill_pids(qemu_pids(str(self.dir)))

    def close(self) -> None:
        kill_pids(qemu_pids(str(self.dir)))
        shutil.rmtree(self.dir, ignore_errors=True)


class LibvirtDebian(Libvirt):
    def __init__(self, accelerator: str) -> None:
        super().__init__(accelerator)
        self.deb = load_image(images_dir(), "debian")

    def create_start_both(self, i: int) -> tuple[float, float]:
        name = f"kasou-bench-ld{i}"
        disk = self.dir / f"{name}.qcow2"
        log = self.dir / f"{name}.log"
        qga = Path(f"/var/lib/libvirt/qemu/{name}.qga")
        log.unlink(missing_ok=True)
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", self.deb.disk_format, "-b",
                        str(self.deb.disk), str(disk)], check=True, timeout=60)  # fmt: skip
        xml = self.dir / f"{name}.xml"
        xml.write_text(self._xml_debian(name, disk, log, qga))
        t0 = time.monotonic()
        try:
            subprocess.run(["virsh", "-c", "qemu:///system", "create", str(xml)], check=True, capture_output=True,
                           timeout=180)  # fmt: skip
            deadline = t0 + TIMEOUT
            return wait_seq(log, deadline) - t0, agent_answers(qga, deadline) - t0
        except (subprocess.SubprocessError, TimeoutError) as e:
            why = (getattr(e, "stderr", None) or b"").decode(errors="replace").strip().splitlines()[-1:]
            self.failures.append(f"{name}: {e}" + (f" ({why[0]})" if why else ""))
            return float("nan"), float("nan")
        finally:
            subprocess.run(["virsh", "-c", "qemu:///system", "destroy", name], capture_output=True, timeout=60)
            disk.unlink(missing_ok=True)

    def _xml_debian(self, name: str, disk: Path, log: Path, qga: Path) -> str:
        dom = "kvm" if self.accel == "kvm" else "qemu"
        tcg = "<tcg><tb-cache unit='MiB'>64</tb-cache></tcg>" if dom == "qemu" else ""
        self.dir.chmod(0o755)
        return f"""<domain type='{dom}'>
  <name>{name}</name><memory unit='MiB'>{MEMORY_MIB}</memory><vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc-q35-7.2'>hvm</type><boot dev='hd'/></os>
  <cpu mode='custom' match='exact'><model fallback='allow'>qemu64</model></cpu>
  <features><acpi/>{tcg}</features>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='{disk}'/><target dev='vda' bus='virtio'/></disk>
    <serial type='file'><source path='{log}'/><target port='0'/></serial>
    <controller type='virtio-serial' index='0'/>
    <channel type='unix'><source mode='bind' path='{qga}'/><target type='virtio' name='org.qemu.guest_agent.0'/></channel>
    <interface type='user'><model type='virtio'/></interface>
    <graphics type='vnc' socket='/var/lib/libvirt/qemu/{name}.vnc'/>
    <video><model type='vga'/></video>
  </devices>
</domain>"""


def main() -> None:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--no-libvirt", action="store_true")
    args = ap.parse_args()
    import asyncio

    if not (images_dir() / "debian" / "manifest.json").is_file():
        subprocess.run([sys.executable, "-m", "kasou", "image", "build", "debian"], check=True, timeout=2700)
    accel = asyncio.run(decide(images_dir())).accelerator
    print(f"accelerator: {accel}; runs: {args.runs}; debian image, {MEMORY_MIB} MiB, 1 vCPU; kasou and bare QEMU: "
          "-machine pc-q35-7.2 -cpu x86-64-v2-AES; libvirt: the same machine, CPU model qemu64 (libvirt 9 names "
          "no x86-64-v2-AES)")  # fmt: skip
    bare = Bare(accel)
    lv = None if args.no_libvirt else LibvirtDebian.ready(accel)
    agent_times: dict[str, list[float]] = {}
    try:
        with kasou_env() as (paths, client, _env):
            serial = paths.logs / "serial"

            def kasou_create_start(i: int) -> tuple[float, float]:
                name = f"kd{i}"
                t0 = time.monotonic()
                job = client.post("/v1/vms", json={"name": name, "image": "debian", "memory_mib": MEMORY_MIB,
                                                   "start": True})["job"]  # fmt: skip
                deadline = t0 + TIMEOUT
                try:
                    seq = wait_seq(serial / f"{name}.log", deadline) - t0
                    while time.monotonic() < deadline:
                        if (client.get(f"/v1/vms/{name}").get("guest") or {}).get("agent"):
                            break
                        time.sleep(0.1)
                    else:
                        raise TimeoutError(f"{name}: the guest agent did not answer")
                    return seq, time.monotonic() - t0
                finally:
                    client.wait_job(job["id"], 60)
                    client.wait_job(client.delete(f"/v1/vms/{name}", params={"force": True})["job"]["id"], 120)

            both: dict[str, Callable[[int], tuple[float, float]]] = {
                "kasou": kasou_create_start,
                "bare QEMU": bare.create_start,
            }
            if lv is not None:
                both["libvirt"] = lv.create_start_both

            def seq_of(fn: Callable[[int], tuple[float, float]], key: str) -> Callable[[int], float]:
                def run(i: int) -> float:
                    s, a = fn(i)
                    agent_times.setdefault(key, []).append(a)
                    return s

                return run

            res = interleave(args.runs, {k: seq_of(fn, k) for k, fn in both.items()})
            print(
                "\ncreate+start of the debian image (seconds): to the writer's first seq / to the guest agent's answer"
            )
            print(f"{'':12}{'seq median':>12}{'min':>8}{'max':>8}{'agent median':>14}")
            for k, xs in res.items():
                xs = [x for x in xs if x == x]
                ags = [x for x in agent_times.get(k, []) if x == x]
                if xs:
                    print(f"{k:12}{median(xs):12.2f}{min(xs):8.2f}{max(xs):8.2f}{median(ags):14.2f}")
                else:
                    print(f"{k:12}  no run finished")
            b_seq, b_agent = median(res["bare QEMU"]), median(agent_times["bare QEMU"])
            print(f"\nratio kasou/bare: first seq {median(res['kasou']) / b_seq:.3f}, guest agent "
                  f"{median(agent_times['kasou']) / b_agent:.3f}  (target <= 1.1)")  # fmt: skip
            if lv is not None and [x for x in res["libvirt"] if x == x]:
                lv_seq = median([x for x in res["libvirt"] if x == x])
                print(f"ratio libvirt/bare: first seq {lv_seq / b_seq:.3f}")
            if lv is not None and lv.failures:
                print(f"libvirt runs that failed (not counted): {len(lv.failures)}: {lv.failures[0]}")
    finally:
        bare.close()
        if lv is not None:
            lv.close()


if __name__ == "__main__":
    os.umask(0o022)
    main()
