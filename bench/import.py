"""Import of a 2 GiB vmdk: kasou (CLI -> API -> job -> agent -> qemu-img) vs a plain ``qemu-img convert``.

A raw disk of 2 GiB is filled with data (a 64 MiB block of random bytes, written again and again:
nothing is zero, so every cluster is read, converted and written) and turned into a vmdk by
``qemu-img convert -O vmdk`` (monolithicSparse; ``--subformat streamOptimized`` for a VMware export's
compressed form). Then, rounds interleaved so that drift and the page cache hit both alike:

- kasou: ``kasou vm import`` of that file into the built-in pool, timed around the CLI command (it
  includes starting the CLI's Python, inspecting the file and following the job), and the API's
  share alone (POST /v1/imports to the job's end, from a running Python);
- plain: ``qemu-img convert -f vmdk -O qcow2`` of the same file to the same directory.

Both write a qcow2 in the same file system, one at a time; each output is removed after its run.
Prints each run, the medians and the ratio kasou / plain (target <= 1.1), and what an import costs
whatever its size (a 1 MiB disk each way, and a CLI command that does nothing: the CLI's own start).

    flock /tmp/kasou-qemu.lock .venv/bin/python bench/import.py [--runs 3] [--size-gib 2]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import KASOU, kasou_env, median

MiB = 1 << 20


def make_vmdk(transfer: Path, size_gib: int, subformat: str) -> Path:
    raw = transfer / "bench.raw"
    block = os.urandom(64 * MiB)
    with open(raw, "wb") as f:
        for _ in range(size_gib * 1024 // 64):
            f.write(block)
    out = transfer / "bench.vmdk"
    subprocess.run(["qemu-img", "convert", "-q", "-f", "raw", "-O", "vmdk", "-o", f"subformat={subformat}",
                    str(raw), str(out)], check=True, timeout=1800)  # fmt: skip
    raw.unlink()
    return out


NOOP = ["vm", "list"]


def fixed_costs(transfer: Path, plain_dir: Path, client: Any, env: dict[str, str], runs: int) -> list[float]:
    """What an import costs whatever its size: a 1 MiB disk through the CLI, the API and plain qemu-img, and
    a CLI command that does nothing (the CLI's own start: Python, its imports, the token, one request)."""
    small = transfer / "small.vmdk"
    subprocess.run(["qemu-img", "create", "-q", "-f", "vmdk", str(small), "1M"], check=True, timeout=60)
    out: list[list[float]] = [[], [], [], []]
    for i in range(runs):
        t = time.monotonic()
        subprocess.run([*KASOU, "vm", "import", f"s{i}", "--disk", small.name, "--memory", "128"], env=env,
                       check=True, capture_output=True, timeout=600)  # fmt: skip
        out[0].append(time.monotonic() - t)
        t = time.monotonic()
        res = client.post("/v1/imports", json={"name": f"t{i}", "disks": [small.name], "memory_mib": 128})
        client.wait_job(res["job"]["id"], 600, interval=0.05)
        out[1].append(time.monotonic() - t)
        t = time.monotonic()
        subprocess.run(["qemu-img", "convert", "-f", "vmdk", "-O", "qcow2", str(small), str(plain_dir / "s.qcow2")],
                       check=True, timeout=600)  # fmt: skip
        out[2].append(time.monotonic() - t)
        (plain_dir / "s.qcow2").unlink()
        t = time.monotonic()
        subprocess.run([*KASOU, *NOOP], env=env, check=True, capture_output=True, timeout=600)
        out[3].append(time.monotonic() - t)
        for name in (f"s{i}", f"t{i}"):
            client.wait_job(client.delete(f"/v1/vms/{name}")["job"]["id"], 120)
    small.unlink()
    return [median(x) for x in out]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--size-gib", type=int, default=2)
    ap.add_argument("--subformat", default="monolithicSparse", choices=["monolithicSparse", "streamOptimized"])
    args = ap.parse_args()
    with kasou_env() as (paths, client, env):
        transfer = paths.transfer
        transfer.mkdir(parents=True, exist_ok=True)
        t0 = time.monotonic()
        src = make_vmdk(transfer, args.size_gib, args.subformat)
        print(f"source: {src.name}, {args.subformat}, {args.size_gib} GiB of data, file {src.stat().st_size / MiB:.0f} "
              f"MiB (made in {time.monotonic() - t0:.1f} s)")  # fmt: skip
        plain_dir = paths.disks / "plain"
        plain_dir.mkdir(parents=True, exist_ok=True)
        cli, api, plain = [], [], []

        def run_kasou(i: int) -> None:
            name = f"imp{i}"
            t = time.monotonic()
            subprocess.run([*KASOU, "vm", "import", name, "--disk", src.name, "--memory", "128"], env=env, check=True,
                           capture_output=True, timeout=3600)  # fmt: skip
            cli.append(time.monotonic() - t)
            client.wait_job(client.delete(f"/v1/vms/{name}")["job"]["id"], 120)
            os.sync()
            name = f"api{i}"
            t = time.monotonic()
            res = client.post("/v1/imports", json={"name": name, "disks": [src.name], "memory_mib": 128})
            client.wait_job(res["job"]["id"], 3600, interval=0.05)
            api.append(time.monotonic() - t)
            client.wait_job(client.delete(f"/v1/vms/{name}")["job"]["id"], 120)

        def run_plain(i: int) -> None:
            out = plain_dir / f"disk{i}.qcow2"
            t = time.monotonic()
            subprocess.run(["qemu-img", "convert", "-f", "vmdk", "-O", "qcow2", str(src), str(out)], check=True,
                           timeout=3600)  # fmt: skip
            plain.append(time.monotonic() - t)
            out.unlink()

        for i in range(args.runs):
            order = [run_kasou, run_plain] if i % 2 == 0 else [run_plain, run_kasou]
            for fn in order:
                os.sync()  # the last run's deleted output is not still being written back during this one
                fn(i)
            print(
                f"run {i + 1}: kasou CLI {cli[-1]:.2f} s, kasou API {api[-1]:.2f} s, plain qemu-img {plain[-1]:.2f} s"
            )
        src.unlink()
        fixed = fixed_costs(transfer, plain_dir, client, env, args.runs)
        m_cli, m_api, m_plain = median(cli), median(api), median(plain)
        print(
            f"medians of {args.runs}: kasou CLI {m_cli:.2f} s, kasou API {m_api:.2f} s, plain qemu-img {m_plain:.2f} s"
        )
        print(f"ratio kasou / plain: CLI {m_cli / m_plain:.3f}, API {m_api / m_plain:.3f} (target <= 1.1)")
        print(f"throughput: kasou {args.size_gib * 1024 / m_cli:.0f} MiB/s, plain {args.size_gib * 1024 / m_plain:.0f} "
              "MiB/s")  # fmt: skip
        print(f"fixed cost (a 1 MiB disk, medians of {args.runs}): kasou CLI {fixed[0]:.2f} s, kasou API "
              f"{fixed[1]:.2f} s, plain qemu-img {fixed[2]:.2f} s; a CLI command that does nothing ({' '.join(NOOP)}) "
              f"{fixed[3]:.2f} s")  # fmt: skip


if __name__ == "__main__":
    main()
