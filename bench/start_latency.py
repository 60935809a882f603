"""Start latency: kasou vs bare QEMU vs libvirt, side by side in one run.

Measures the wall time from "create and start" to the guest's readiness line
(``KASOU-READY`` on the serial console) for:

  (a) kasou: ``POST /v1/vms`` with ``start`` (disk copy + QEMU start through the agent),
      and ``start`` of an already defined VM;
  (b) bare QEMU: the same ``qemu-img convert`` and the same ``qemu-system-x86_64`` command line
      kasou uses (without its confinement), run directly with ``-daemonize``;
  (c) libvirt: ``virsh create`` of the same guest (installed and started here if missing).

Runs are interleaved so machine noise hits all alike. Then 10 VMs run under
kasou and the agent's resident memory is reported.

    .venv/bin/python bench/start_latency.py [--runs 7] [--no-libvirt]
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Self

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (
    READY,
    ensure_image,
    images_dir,
    interleave,
    kasou_env,
    kill_pids,
    median,
    qemu_pids,
    rss_mib,
    wait_line,
)
from kasou.hypervisor.base import LaunchDisk, LaunchSpec
from kasou.hypervisor.qemu.accel import decide
from kasou.hypervisor.qemu.cmdline import BootFiles, RuntimeFiles, build_argv
from kasou.image import load_image

TIMEOUT = 120.0


class Bare:
    """The same QEMU command line kasou builds, run by hand."""

    def __init__(self, accelerator: str) -> None:
        self.art = load_image(images_dir(), "tiny")
        self.accel = accelerator
        self.dir = Path(tempfile.mkdtemp(prefix="kasou-bare-", dir="/tmp"))

    def _disk(self, name: str) -> Path:
        disk = self.dir / f"{name}.qcow2"
        subprocess.run(
            [
                "qemu-img",
                "convert",
                "-q",
                "-f",
                self.art.disk_format,
                "-O",
                "qcow2",
                str(self.art.disk),
                str(disk),
            ],
            check=True,
        )
        return disk

    def _boot(self, name: str, disk: Path) -> float:
        files = RuntimeFiles(dir=self.dir / name, serial_log=self.dir / f"{name}.log")
        files.dir.mkdir()
        spec = LaunchSpec(
            name=name, uuid=str(uuid.uuid4()), vcpus=1, memory_mib=128, image="tiny",
            disks=[LaunchDisk(id="disk0", path=str(disk))],
        )  # fmt: skip
        argv = build_argv(spec, files, self.accel, BootFiles(self.art.kernel, self.art.initrd, self.art.kernel_args))
        # kasou spawns QEMU itself and waits for its monitor; by hand, -daemonize returns once it runs.
        subprocess.run([*argv, "-daemonize"], check=True, capture_output=True, timeout=60)
        return wait_line(files.serial_log, READY, TIMEOUT)

    def create_start(self, i: int) -> float:
        t0 = time.monotonic()
        disk = self._disk(f"bc{i}")
        t = self._boot(f"bc{i}", disk) - t0
        self.cleanup()
        return t

    def start(self, i: int) -> float:
        disk = self._disk(f"bs{i}")
        t0 = time.monotonic()
        t = self._boot(f"bs{i}", disk) - t0
        self.cleanup()
        return t

    def cleanup(self) -> None:
        kill_pids(qemu_pids(str(self.dir)))

    def close(self) -> None:
        self.cleanup()
        shutil.rmtree(self.dir, ignore_errors=True)


LIBVIRT_PACKAGES = ["libvirt-daemon", "libvirt-daemon-driver-qemu", "libvirt-clients"]


class Libvirt:
    """libvirt 9 on this host: installed and started if missing, stopped again if we started it."""

    def __init__(self, accelerator: str) -> None:
        self.art = load_image(images_dir(), "tiny")
        self.accel = accelerator
        self.started_daemon: int | None = None
        self.started_logd: int | None = None
        self.failures: list[str] = []  # runs libvirt did not finish (virsh create hanging is not unknown here)
        self.dir = Path("/var/lib/libvirt/images/kasou-bench")

    @classmethod
    def ready(cls, accelerator: str) -> Self | None:
        """libvirt set up to measure (installed and started if missing), or None, saying why it is not."""
        lv = cls(accelerator)
        try:
            lv.setup()
        except (subprocess.CalledProcessError, RuntimeError, OSError) as e:
            print(f"libvirt: not measured ({e})")
            return None
        return lv

    def setup(self) -> None:
        if shutil.which("virsh") is None or shutil.which("libvirtd") is None:
            subprocess.run(["apt-get", "update", "-qq"], check=True)
            subprocess.run(
                ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *LIBVIRT_PACKAGES],
                check=True, env=dict(os.environ, DEBIAN_FRONTEND="noninteractive"), capture_output=True,
            )  # fmt: skip
        for d in ("/var/log/libvirt", "/var/run/libvirt", "/var/lib/libvirt/qemu", "/var/cache/libvirt"):
            Path(d).mkdir(parents=True, exist_ok=True)
        # Debian's qemu.conf runs guests as user and group libvirt-qemu (in group kvm).
        for group in ("kvm", "libvirt-qemu"):
            if subprocess.run(["getent", "group", group], capture_output=True).returncode != 0:
                subprocess.run(["groupadd", "-r", group], check=True)
        if subprocess.run(["getent", "passwd", "libvirt-qemu"], capture_output=True).returncode != 0:
            subprocess.run(
                ["useradd", "-r", "-g", "libvirt-qemu", "-G", "kvm", "-d", "/var/lib/libvirt", "libvirt-qemu"],
                check=True,
            )
        logd_running = subprocess.run(["pgrep", "-x", "virtlogd"], capture_output=True).returncode == 0
        if not logd_running:  # a socket left by a virtlogd that is gone refuses connections: start a new one
            Path("/run/libvirt/virtlogd-sock").unlink(missing_ok=True)
            subprocess.run(["virtlogd", "-d"], check=True)  # libvirt logs each guest's console through it
            out = subprocess.run(["pgrep", "-x", "virtlogd"], capture_output=True, text=True).stdout.split()
            self.started_logd = int(out[0]) if out else None
        if not self._answers():
            subprocess.run(["libvirtd", "-d"], check=True)
            deadline = time.monotonic() + 30
            while not self._answers():
                if time.monotonic() > deadline:
                    raise RuntimeError("libvirtd did not answer within 30 s")
                time.sleep(0.2)
            out = subprocess.run(["pgrep", "-x", "libvirtd"], capture_output=True, text=True).stdout.split()
            self.started_daemon = int(out[0]) if out else None
        self.dir.mkdir(parents=True, exist_ok=True)
        self.dir.chmod(0o755)
        # The first guest makes libvirtd probe QEMU's capabilities (slow under TCG): do it before timing.
        subprocess.run(["virsh", "-c", "qemu:///system", "capabilities"], capture_output=True, timeout=300)
        subprocess.run(["virsh", "-c", "qemu:///system", "domcapabilities"], capture_output=True, timeout=300)

    def _answers(self) -> bool:
        r = subprocess.run(["virsh", "-c", "qemu:///system", "version"], capture_output=True, timeout=30)
        return r.returncode == 0

    def create_start(self, i: int) -> float:
        name = f"kasou-bench-lv{i}"
        disk = self.dir / f"{name}.qcow2"
        log = self.dir / f"{name}.log"
        log.unlink(missing_ok=True)
        subprocess.run(
            [
                "qemu-img",
                "convert",
                "-q",
                "-f",
                self.art.disk_format,
                "-O",
                "qcow2",
                str(self.art.disk),
                str(disk),
            ],
            check=True,
        )
        xml = self.dir / f"{name}.xml"
        xml.write_text(self._xml(name, disk, log))
        t0 = time.monotonic()
        try:
            subprocess.run(
                ["virsh", "-c", "qemu:///system", "create", str(xml)], check=True, capture_output=True, timeout=180
            )
            return wait_line(log, READY, TIMEOUT) - t0
        except (subprocess.SubprocessError, TimeoutError) as e:
            self.failures.append(f"{name}: {e}")
            return float("nan")
        finally:
            subprocess.run(["virsh", "-c", "qemu:///system", "destroy", name], capture_output=True, timeout=60)
            disk.unlink(missing_ok=True)

    def _xml(self, name: str, disk: Path, log: Path) -> str:
        dom = "kvm" if self.accel == "kvm" else "qemu"
        tcg = "<tcg><tb-cache unit='MiB'>64</tb-cache></tcg>" if dom == "qemu" else ""
        return f"""<domain type='{dom}'>
  <name>{name}</name><memory unit='MiB'>128</memory><vcpu>1</vcpu>
  <os><type arch='x86_64' machine='q35'>hvm</type>
    <kernel>{self.art.kernel}</kernel><initrd>{self.art.initrd}</initrd><cmdline>{self.art.kernel_args}</cmdline></os>
  <features><acpi/>{tcg}</features>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='{disk}'/><target dev='vda' bus='virtio'/></disk>
    <serial type='file'><source path='{log}'/><target port='0'/></serial>
    <controller type='virtio-serial' index='0'/>
    <channel type='unix'><target type='virtio' name='org.kasou.heartbeat'/></channel>
    <interface type='user'><model type='virtio'/></interface>
    <graphics type='vnc' socket='/var/lib/libvirt/qemu/{name}.vnc'/>
    <video><model type='vga'/></video>
  </devices>
</domain>"""

    def close(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)
        for pid in (self.started_daemon, self.started_logd):
            if pid:
                kill_pids([pid])


def main() -> None:
    # A SIGTERM (e.g. from timeout) must still run the cleanup below.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--no-libvirt", action="store_true")
    ap.add_argument("--vms", type=int, default=10, help="VMs for the agent memory figure")
    ap.add_argument("--memory-only", action="store_true", help="only the agent memory figure")
    args = ap.parse_args()

    import asyncio

    ensure_image()
    # 10 one-vCPU guests on a 2-core host exceed the default 4:1 vCPU overcommit: allow what is asked.
    os.environ.setdefault("KASOU_VCPU_RATIO", str(max(4, -(-args.vms // (os.cpu_count() or 1)))))
    accel = asyncio.run(decide(images_dir())).accelerator
    print(f"accelerator: {accel}; runs: {args.runs}")
    bare = Bare(accel)
    lv = None if args.no_libvirt else Libvirt.ready(accel)
    try:
        with kasou_env() as (paths, client, _env):
            serial = paths.logs / "serial"

            def kasou_create_start(i: int) -> float:
                name = f"kc{i}"
                t0 = time.monotonic()
                job = client.post("/v1/vms", json={"name": name, "image": "tiny", "start": True})["job"]
                t = wait_line(serial / f"{name}.log", READY, TIMEOUT) - t0
                client.wait_job(job["id"], 60)
                client.wait_job(client.delete(f"/v1/vms/{name}", params={"force": True})["job"]["id"], 60)
                return t

            def kasou_start(i: int) -> float:
                name = f"ks{i}"
                client.wait_job(client.post("/v1/vms", json={"name": name, "image": "tiny"})["job"]["id"], 60)
                t0 = time.monotonic()
                job = client.post(f"/v1/vms/{name}/actions/start")["job"]
                t = wait_line(serial / f"{name}.log", READY, TIMEOUT) - t0
                client.wait_job(job["id"], 60)
                client.wait_job(client.delete(f"/v1/vms/{name}", params={"force": True})["job"]["id"], 60)
                return t

            runners: dict[str, Callable[[int], float]] = (
                {}
                if args.memory_only
                else {
                    "kasou create+start": kasou_create_start,
                    "bare create+start": bare.create_start,
                    "kasou start": kasou_start,
                    "bare start": bare.start,
                }
            )
            if lv is not None:
                runners["libvirt create"] = lv.create_start
            # One warm-up round (page cache, the agent's first QMP connection), not counted.
            for fn in runners.values():
                fn(1000)
            res = interleave(args.runs, runners) if runners else {}
            if args.memory_only:
                res = {}

            if res:
                for k in res:  # a run libvirt failed is reported, not counted
                    res[k] = [x for x in res[k] if x == x]
                print("\nwall time to the guest's readiness line (seconds)")
                print(f"{'':22}{'median':>8}{'min':>8}{'max':>8}")
                for k, xs in res.items():
                    if xs:
                        print(f"{k:22}{median(xs):8.3f}{min(xs):8.3f}{max(xs):8.3f}")
                    else:
                        print(f"{k:22}  no run finished")
                r1 = median(res["kasou create+start"]) / median(res["bare create+start"])
                r2 = median(res["kasou start"]) / median(res["bare start"])
                print(f"\nratio kasou/bare, create+start: {r1:.3f}  (target <= 1.15)")
                print(f"ratio kasou/bare, start:        {r2:.3f}")
                if lv is not None and res["libvirt create"]:
                    lvm = median(res["libvirt create"])
                    bm = median(res["bare create+start"])
                    print(f"ratio libvirt/bare:             {lvm / bm:.3f}  (libvirt adds {lvm - bm:+.2f} s)")
                if lv is not None and lv.failures:
                    print(f"libvirt runs that failed or hung (not counted): {len(lv.failures)}: {lv.failures[0]}")

            # Resident memory of kasou's services with N running VMs.
            names = [f"m{i}" for i in range(args.vms)]
            jobs = [client.post("/v1/vms", json={"name": n, "image": "tiny", "start": True})["job"] for n in names]
            for j in jobs:
                client.wait_job(j["id"], 120)
            for n in names:
                wait_line(serial / f"{n}.log", READY, 180)
            time.sleep(2)
            agent_pid = int(paths.pidfile("agent").read_text())
            api_pid = int(paths.pidfile("api").read_text())
            qrss = [rss_mib(p) for p in qemu_pids(str(paths.vm_run))]
            print(f"\nwith {args.vms} running VMs: agent RSS {rss_mib(agent_pid):.1f} MiB, API RSS {rss_mib(api_pid):.1f} MiB, "
                  f"QEMU RSS median {median(qrss):.1f} MiB per 128 MiB guest")  # fmt: skip
    finally:
        bare.close()
        if lv is not None:
            lv.close()


if __name__ == "__main__":
    main()
