"""Live migration: kasou (the whole stack on a 2-host lab) vs a bare QMP ``migrate``, side by side.

For an idle 128 MiB tiny guest and for one that dirties memory (a loop writing
32 MiB in its RAM, typed on its serial console), prints QEMU's reported downtime
and total time, medians over --runs, and the ratio kasou/bare. Both migrate the
same way: from the lab's namespace of h1 to that of h2 over their link, the stream
over QEMU's TLS with the lab hosts' certificates, the same migration parameters, a
disk file both hosts open; both totals are QEMU's ``total-time`` from query-migrate.
Beside them, each side's wall clock around the same steps (kasou: the ``vm migrate``
command; bare: destination start to ``cont``), and the QEMU options on which the two
command lines differ. Then a guest
on a local disk (copied with the memory) and one on a mirrored disk (copied, and
a new second copy filled on the new host before the job ends): the CLI's wall
time and the ratio mirrored/local.

    .venv/bin/python bench/migration.py [--runs 5]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from qemu.qmp import QMPClient

from _common import KASOU, READY, ensure_image, images_dir, kill_pids, lab_env, median, qemu_pids, wait_line
from kasou.config import Paths
from kasou.hypervisor.base import LaunchDisk, LaunchSpec
from kasou.hypervisor.qemu import tls as qtls
from kasou.hypervisor.qemu.cmdline import BootFiles, RuntimeFiles, build_argv
from kasou.hypervisor.qemu.migration import DEFAULT_BANDWIDTH_MIB_S
from kasou.image import load_image
from kasou.model.spec import NicSpec

MiB = 1024 * 1024
LAB_ADDRESS = {"h1": "10.88.0.11", "h2": "10.88.0.12"}  # the lab hosts' addresses (kasou.lab.hosts)

DIRTY = "while true; do dd if=/dev/zero of=/tmp/dirty bs=1M count=32 2>/dev/null; done &\n"


def type_on_serial(sock: Path, text: str) -> None:
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(5)
        s.connect(str(sock))
        s.sendall(text.encode())
        time.sleep(0.3)


def bare_spec(name: str, disk: Path) -> LaunchSpec:
    """The guest as kasou's ``vm create --image tiny`` makes it: 1 vCPU, 128 MiB, one disk, one NIC
    on the user-mode network."""
    return LaunchSpec(name=name, uuid=str(uuid.uuid4()), vcpus=1, memory_mib=128, image="tiny",
                      disks=[LaunchDisk(id="disk0", path=str(disk))],
                      nics=[NicSpec(id="net0", mac="52:54:00:00:00:01")])  # fmt: skip


def ns_of(host: str) -> list[str]:
    """Run a command in a lab host's network namespace (as the lab runs that host's QEMUs)."""
    return ["ip", "netns", "exec", f"klab-{host}"]


async def bare_once(tmp: Path, lab_dir: Path, i: int, dirty: bool) -> tuple[float, float, float]:
    """The same migration without kasou: two QEMU processes in the lab's namespaces of h1 and h2,
    the stream over TLS with the lab hosts' certificates (QEMU's tls-creds-x509, verify-peer, the
    destination's address as tls-hostname), the same parameters as kasou sets (downtime limit
    100 ms, auto-converge, max-bandwidth), a destination started paused with ``-incoming defer``
    and ``late-block-activate``, and ``cont`` there at the end. Returns QEMU's downtime and
    total time (``query-migrate`` on the source, as kasou's job reports them) and the wall time
    of the same steps (destination QEMU start to ``cont``, as kasou's CLI does them)."""
    art = load_image(images_dir(), "tiny")
    boot = BootFiles(art.kernel, art.initrd, art.kernel_args)
    disk = tmp / f"d{i}.qcow2"  # one file both QEMUs open (kasou's --shared)
    subprocess.run(
        ["qemu-img", "convert", "-q", "-f", art.disk_format, "-O", "qcow2", str(art.disk), str(disk)], check=True
    )
    spec = bare_spec(f"bm{i}", disk)
    fa = RuntimeFiles(tmp / f"a{i}", tmp / f"a{i}.log")
    fb = RuntimeFiles(tmp / f"b{i}", tmp / f"b{i}.log")
    fa.dir.mkdir()
    fb.dir.mkdir()
    creds = {}
    for h in ("h1", "h2"):
        files = Paths(home=lab_dir / h / "home", images=images_dir()).tls_files()
        d = qtls.prepare(files, tmp / f"tls-{h}-{i}")
        assert d is not None, f"the lab host {h} has no TLS files"
        creds[h] = d
    subprocess.run([*ns_of("h1"), *build_argv(spec, fa, "tcg", boot), "-daemonize"], check=True)  # by hand: daemonized
    wait_line(fa.serial_log, READY, 120)
    if dirty:
        type_on_serial(fa.serial, DIRTY)
    qa, qb = QMPClient("a"), QMPClient("b")
    t_wall = time.monotonic()
    subprocess.run([*ns_of("h2"), *build_argv(spec, fb, "tcg", boot, incoming="defer"), "-daemonize"], check=True)
    await qb.connect(str(fb.qmp))
    await qb.execute(
        "migrate-set-capabilities", {"capabilities": [{"capability": "late-block-activate", "state": True}]}
    )
    await qb.execute("object-add", qtls.creds_object("server", creds["h2"]))
    await qb.execute("migrate-set-parameters", {"tls-creds": qtls.SERVER_ID})
    dest = LAB_ADDRESS["h2"]
    for _ in range(20):
        uri = f"tcp:{dest}:{random.randint(49152, 60999)}"
        try:
            await qb.execute("migrate-incoming", {"uri": uri})
            break
        except Exception:  # the port is taken: another one
            continue
    else:
        raise RuntimeError("the bare destination found no free port")
    await qa.connect(str(fa.qmp))
    await qa.execute("migrate-set-capabilities", {"capabilities": [{"capability": "auto-converge", "state": True}]})
    await qa.execute("object-add", qtls.creds_object("client", creds["h1"]))
    await qa.execute("migrate-set-parameters", {"downtime-limit": 100, "max-bandwidth": DEFAULT_BANDWIDTH_MIB_S * MiB,
                                                "tls-creds": qtls.CLIENT_ID, "tls-hostname": dest})  # fmt: skip
    await qa.execute("migrate", {"uri": uri})
    while True:
        st = await qa.execute("query-migrate")
        if st.get("status") == "completed":
            break
        if st.get("status") in ("failed", "cancelled"):
            raise RuntimeError(f"bare migration {st}")
        await asyncio.sleep(0.01)
    await qb.execute("cont")
    with contextlib.suppress(Exception):  # QEMU may close the monitor before it answers
        await qa.execute("quit")
    wall = time.monotonic() - t_wall
    for q in (qa, qb):
        with contextlib.suppress(Exception):
            await q.disconnect()
    kill_pids(qemu_pids(str(tmp)))
    return float(st.get("downtime", 0)), float(st.get("total-time", 0)), wall * 1000


def kasou_argv(lab_dir: Path, vm: str) -> list[str]:
    """The command line of kasou's QEMU for ``vm`` in the lab (to print what differs from the bare one)."""
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                args = (d / "cmdline").read_bytes().decode(errors="replace").split("\0")
            except OSError:
                continue
            if args[0].startswith("qemu-system") and any(f"/{vm}/" in a for a in args) and "-incoming" not in args:
                return [a for a in args if a]
    return []


def options(argv: list[str]) -> set[str]:
    """A QEMU command line's options and their values, with paths and names that differ anyway left out."""
    out = set()
    for opt, val in zip(argv, [*argv[1:], ""], strict=True):
        if opt in ("-uuid", "-name"):
            out.add(opt)
        elif opt.startswith("-"):
            kept = ",".join(
                p for p in val.split(",") if "/" not in p and not p.startswith(("id=", "uuid", "name", "mac="))
            )
            out.add(f"{opt} {kept}".strip() if not val.startswith("-") else opt)
    return out


def main() -> None:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so that the lab is taken down
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    ensure_image()
    lab_dir = Path(tempfile.mkdtemp(prefix="kasou-bench-lab-", dir="/tmp"))
    env = dict(os.environ, KASOU_LAB_DIR=str(lab_dir))
    tmp = Path(tempfile.mkdtemp(prefix="kasou-bench-mig-", dir="/tmp"))
    res: dict[str, list[tuple[float, float]]] = {}
    try:
        subprocess.run([*KASOU, "lab", "up", "--hosts", "2"], env=env, check=True, capture_output=True, timeout=180)
        env = lab_env(env, "h1")

        def kasou(*a: str) -> str:
            return subprocess.run([*KASOU, *a], env=env, capture_output=True, text=True, check=True, timeout=600).stdout

        for dirty in (False, True):
            label = "dirtying" if dirty else "idle"
            kasou("vm", "create", "m", "--image", "tiny", "--shared", "--start")
            host = json.loads(kasou("vm", "show", "m", "--json"))["host"]
            wait_line(lab_dir / host / "home" / "log" / "serial" / "m.log", READY, 120)
            if dirty:
                sock = next(Path("/run/kasou").rglob("m/serial.sock"), None) or next(lab_dir.rglob("m/serial.sock"))
                type_on_serial(sock, DIRTY)
            else:
                art = load_image(images_dir(), "tiny")
                bare = build_argv(bare_spec("m", Path("/x")), RuntimeFiles(tmp / "x", tmp / "x.log"), "tcg",
                                  BootFiles(art.kernel, art.initrd, art.kernel_args))  # fmt: skip
                theirs = options(kasou_argv(lab_dir, "m"))
                ours = options(bare)
                print("QEMU options only kasou's VM has:", " ".join(sorted(theirs - ours)) or "none")
                print("QEMU options only the bare VM has:", " ".join(sorted(ours - theirs)) or "none")
            for i in range(args.runs):
                t0 = time.monotonic()
                kasou("vm", "migrate", "m")
                wall = (time.monotonic() - t0) * 1000
                job = json.loads(kasou("job", "list", "--vm", "m", "--json"))[-1]
                r = job["result"]
                res.setdefault(f"kasou {label}", []).append((float(r["downtime_ms"]), float(r["total_ms"])))
                res.setdefault(f"kasou {label} (CLI wall)", []).append((float(r["downtime_ms"]), wall))
                down, total, bare_wall = asyncio.run(bare_once(tmp, lab_dir, i + (100 if dirty else 0), dirty))
                res.setdefault(f"bare {label}", []).append((down, total))
                res.setdefault(f"bare {label} (steps wall)", []).append((down, bare_wall))
            kasou("vm", "delete", "m", "--force")
        # Local disks: copied with the memory; a mirrored disk also gets a new second copy on the new host.
        for pool in ("ma", "mb"):
            kasou("pool", "create", pool, "--path", str(lab_dir / f"pool-{pool}"))
        for label, extra in (("local disk", []), ("mirrored disk", ["--mirror", "ma,mb"])):
            kasou("vm", "create", "d", "--image", "tiny", *extra, "--start")
            host = json.loads(kasou("vm", "show", "d", "--json"))["host"]
            wait_line(lab_dir / host / "home" / "log" / "serial" / "d.log", READY, 120)
            for _ in range(args.runs):
                t0 = time.monotonic()
                kasou("vm", "migrate", "d")
                wall = (time.monotonic() - t0) * 1000
                v = json.loads(kasou("vm", "show", "d", "--json"))
                mirror = v["disks"][0]["mirror"]
                assert mirror is None or mirror["state"] == "in_sync", mirror  # back in sync when the job ends
                r = json.loads(kasou("job", "list", "--vm", "d", "--json"))[-1]["result"]
                res.setdefault(f"kasou {label} (CLI wall)", []).append((float(r["downtime_ms"]), wall))
            kasou("vm", "delete", "d", "--force")
        print("total ms: QEMU's total-time (query-migrate on the source) for 'kasou' and 'bare'; wall clock for")
        print("'(CLI wall)' (the kasou vm migrate command) and '(steps wall)' (destination start to cont, bare)")
        print(f"{'':32}{'downtime ms':>12}{'total ms':>10}   (medians of {args.runs})")
        for k, xs in res.items():
            print(f"{k:32}{median([x[0] for x in xs]):12.1f}{median([x[1] for x in xs]):10.1f}")
        for label in ("idle", "dirtying"):
            for a, b_ in (
                (f"kasou {label}", f"bare {label}"),
                (f"kasou {label} (CLI wall)", f"bare {label} (steps wall)"),
            ):
                k, b = res[a], res[b_]
                print(f"ratio {a} / {b_}: {median([x[1] for x in k]) / median([x[1] for x in b]):.2f}")
        m, loc = res["kasou mirrored disk (CLI wall)"], res["kasou local disk (CLI wall)"]
        print(
            f"ratio mirrored/local disk, CLI wall (the mirrored one includes filling the new second copy): "
            f"{median([x[1] for x in m]) / median([x[1] for x in loc]):.2f}"
        )
    finally:
        subprocess.run([*KASOU, "lab", "down"], env=env, capture_output=True, timeout=180)
        kill_pids(qemu_pids(str(tmp)))
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(lab_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
