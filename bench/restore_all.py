"""Restore all 33 department VMs of the sample hospital from the second site: the time, beside the lower bound set
by the disk bytes over this file system's measured throughput.

The site before the attack: a private kasou (``kasou up``: agent and API, own KASOU_HOME) and backup server A
(``kasou backup-server init`` + ``serve`` over HTTPS on loopback), set up as an administrator does it
(``kasou backup key create``, ``kasou backup server set``). One VM per department server of ``kasou plan
sample`` (the 400-bed hospital's 33 servers), named after it, with its criticality and the HA priority of it as
``kasou plan apply`` gives it (24h-clinical 90, business-hours 50, batch 10), the tiny test guest as its boot
disk and one data disk of the same small size for every VM (``--disk-mib``), most of it random data of its own
(``--fill``; random, so neither dedup nor zstd shrink it), written with ``qemu-img convert -n``. Each VM is
backed up with ``kasou backup create`` (the agent copies the generation to A). Second site B pulls from A
(``kasou backup-server sync --from A``). Then A is stopped and the whole site is torn down (its kasou, every
VM and disk, every host-side generation): a fresh kasou stands for the rebuilt hosts, given B (``kasou backup
server set`` with a reader token of B), and ``kasou backup restore-all --from-server --key FILE --json`` is
timed (CLI wall clock, the CLI's Python start included) until every VM is restored (stopped).

Lower bound, measured in the same run on the same file system right after the restore (``--rounds``,
medians): (a) disk write: as many bytes as the restored disks hold data (``qemu-img map``), random,
written 4 MiB at a time into a new file and fsynced; (b) store read + disk write: B's chunk files of the restored generations read and written into
one file, fsynced (what any restore must at least do: read the server's store, write the disks). Lower bound
= data bytes / throughput; kasou's time / lower bound is the figure that carries over to the hospital's real
disks (the sample's ``disk_gib``, 92 TiB in all; here each VM's disks are scaled down to the same
small size). Then a sample of the restored VMs (the first ``--boot`` in restore order) is started and timed to
the guest's readiness line, one after the other (33 TCG guests at once would not fit this 2-core machine's
time budget: the restore is measured without ``--start``). Last, every VM deleted again and the same restore run
with ``restore-all --parallel N`` (``--parallel``: N restores at once, started in priority order), to see what
restoring VMs side by side gains on this machine (restores are CPU-bound here: TLS, decryption, hashing).

Run it under the machine's QEMU lock; it records the run in ``--out`` (bench/results/restore_all.json):

    flock /tmp/kasou-qemu.lock .venv/bin/python bench/restore_all.py [--vms 33] [--disk-mib 128] [--fill 0.875]
        [--rounds 3] [--boot 3] [--parallel 2] [--out bench/results/restore_all.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import KASOU, READY, ensure_image, images_dir, kasou_env, median, wait_line
from backup_server import Server, backup_server, kasou, run, writer_token
from kasou.planner.inventory import sample_inventory
from kasou.vault.immutable import release_tree

MiB, GiB = 1 << 20, 1 << 30
PRIORITY = {"24h-clinical": 90, "business-hours": 50, "batch": 10}  # as `kasou plan apply` sets it (docs/planner.md)
RESTORE_TIMEOUT_S = 1800
BOOT_TIMEOUT_S = 180


def reader_token(server: Server, env: dict[str, str], name: str) -> str:
    out = kasou(env, "backup-server", "client", "add", name, "--role", "reader", "--dir", str(server.root))
    return out.split("token ")[1].split()[0]


def fill(disk: Path, size: int, data: int, scratch: Path) -> None:
    """The first ``data`` bytes of the qcow2 ``disk`` random (a raw file written here, ``qemu-img convert -n``)."""
    raw = scratch / "fill.raw"
    with open(raw, "wb") as f:
        f.truncate(size)
        left = data
        while left:
            n = min(left, 16 * MiB)
            f.write(os.urandom(n))
            left -= n
    run(["qemu-img", "convert", "-n", "-f", "raw", "-O", "qcow2", str(raw), str(disk)], timeout=600)
    raw.unlink()


def generation_files(root: Path) -> dict[str, dict[str, Any]]:
    """The newest generation's index of each VM in a backup server's data directory."""
    out = {}
    for d in sorted((root / "generations").iterdir()):
        newest = max(d.glob("*.json"))
        out[d.name] = json.loads(newest.read_text())
    return out


def data_bytes(index: dict[str, Any]) -> tuple[int, int]:
    """Logical bytes and bytes with data (chunks that are not all zero) of a generation's disks."""
    cs = int(index["chunk_size"])
    logical = data = 0
    for d in index["disks"]:
        size = int(d["size"])
        logical += size
        data += sum(min(cs, size - i * cs) for i, c in enumerate(d["chunks"]) if c is not None)
    return logical, data


def map_data(disk: Path) -> int:
    """The bytes of data a restored disk holds (``qemu-img map``: allocated and not zero)."""
    return sum(int(e["length"]) for e in json.loads(run(["qemu-img", "map", "--output=json", "-U", str(disk)]))
               if e.get("data"))  # fmt: skip


def chunk_files(root: Path, indexes: dict[str, dict[str, Any]]) -> list[Path]:
    """The store's files of every chunk the restore reads, once per time it is read (a chunk shared by two VMs'
    disks is read for each)."""
    return [root / "chunks" / c[:4] / c for ix in indexes.values() for d in ix["disks"] for c in d["chunks"] if c]


def disk_write(dest: Path, nbytes: int) -> float:
    """``nbytes`` of random data (a 64 MiB pool, written 4 MiB at a time) into a new file, fsynced: seconds. Random,
    not zeros: storage under this machine may treat zeros apart."""
    pool = os.urandom(64 * MiB)
    t = time.monotonic()
    with open(dest, "wb") as out:
        left, off = nbytes, 0
        while left:
            n = min(left, 4 * MiB)
            out.write(pool[off : off + n])
            left, off = left - n, (off + n) % (64 * MiB)
        out.flush()
        os.fsync(out.fileno())
    took = time.monotonic() - t
    dest.unlink()
    return took


def store_copy(files: list[Path], dest: Path) -> tuple[float, int]:
    """Every chunk file read from the store and written into one file, fsynced: seconds and bytes."""
    n = 0
    t = time.monotonic()
    with open(dest, "wb") as out:
        for p in files:
            with open(p, "rb") as f:
                n += out.write(f.read())
        out.flush()
        os.fsync(out.fileno())
    took = time.monotonic() - t
    dest.unlink()
    return took, n


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--vms", type=int, default=33, help="the first N servers of the sample (default: all 33)")
    ap.add_argument("--disk-mib", type=int, default=128, help="each VM's data disk (the same for every VM)")
    ap.add_argument("--fill", type=float, default=0.875, help="share of the data disk written with random data")
    ap.add_argument("--rounds", type=int, default=3, help="rounds of each throughput measurement")
    ap.add_argument("--boot", type=int, default=3, help="restored VMs started afterwards, in restore order")
    ap.add_argument("--parallel", type=int, default=2, help="then restore-all --parallel N (0 or 1: not measured)")
    ap.add_argument("--out", type=Path, default=None, help="record the run here (JSON)")
    args = ap.parse_args()
    servers = sample_inventory()[: args.vms]
    size = args.disk_mib * MiB
    own = int(size * args.fill) // (4 * MiB) * (4 * MiB)
    if not (images_dir() / "tiny" / "manifest.json").exists():
        ensure_image()
    command = " ".join([Path(sys.executable).name, *sys.argv])
    print(f"command: {command}")
    hospital = sum(s.disk_gib for s in servers)
    print(f"{len(servers)} VMs named after `kasou plan sample`'s department servers; their real disks hold "
          f"{hospital:,.0f} GiB, here each VM has the tiny guest's 64 MiB boot disk and a {args.disk_mib} MiB data "
          f"disk with {own // MiB} MiB of random data of its own: sizes are scaled down, the bytes per second and "
          "the ratio to the lower bound are what carry over", flush=True)  # fmt: skip
    t_all = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="kasou-bra-", dir="/tmp"))
    base_env = dict(os.environ)
    record: dict[str, Any] = {"command": command, "date": time.strftime("%Y-%m-%d"), "vms": len(servers),
                              "disk_mib": args.disk_mib, "random_mib_per_vm": own // MiB}  # fmt: skip
    try:
        keyfile = work / "site-backup.key"
        print(kasou(base_env, "backup", "key", "create", "--out", str(keyfile)).splitlines()[0])
        with backup_server(work / "site-b", base_env) as b:
            # -- the site before the attack: VMs, backups on A, B pulls from A -------------------------------
            with kasou_env() as (_paths, client, env), backup_server(work / "site-a", base_env) as a:
                print(kasou(env, "backup", "server", "set", "--url", a.url, "--token-stdin", "--fingerprint",
                            a.fingerprint, "--public-key", f"{keyfile}.pub",
                            stdin=writer_token(a, env, "hypervisors") + "\n").strip())  # fmt: skip
                t = time.monotonic()
                for s in servers:
                    kasou(env, "vm", "create", s.name, "--image", "tiny", "--memory", "128", "--disk", "64M",
                          "--disk", f"{args.disk_mib}M", "--priority", str(PRIORITY[s.criticality]),
                          "--criticality", s.criticality, "--description", s.department)  # fmt: skip
                    disk = Path(client.get(f"/v1/vms/{s.name}")["disks"][1]["path"])
                    fill(disk, size, own, work)
                print(f"made {len(servers)} VMs and their data in {time.monotonic() - t:.0f} s", flush=True)
                t = time.monotonic()
                for s in servers:
                    out = kasou(env, "backup", "create", s.name)
                    if "copied to the backup server" not in out:
                        raise RuntimeError(f"the backup of {s.name} was not copied to A: {out.strip()[-300:]}")
                print(f"backed up {len(servers)} VMs to A (kasou backup create) in {time.monotonic() - t:.0f} s",
                      flush=True)  # fmt: skip
                t = time.monotonic()
                kasou(base_env, "backup-server", "sync", "--from", a.url, "--token", reader_token(a, base_env, "site-b"),
                      "--fingerprint", a.fingerprint, "--dir", str(b.root))  # fmt: skip
                print(f"B pulled from A (kasou backup-server sync --from) in {time.monotonic() - t:.0f} s", flush=True)
            print("A stopped; the site's kasou, its VMs, disks and host-side generations are gone", flush=True)

            # -- the rebuilt site: a fresh kasou, B's reader token, restore-all ---------------------------------
            indexes = generation_files(b.root)
            if sorted(indexes) != sorted(s.name for s in servers):
                raise RuntimeError(f"B holds {sorted(indexes)}, not the {len(servers)} VMs")
            logical = sum(data_bytes(ix)[0] for ix in indexes.values())
            data = sum(data_bytes(ix)[1] for ix in indexes.values())
            with kasou_env() as (paths, client, env):
                print(kasou(env, "backup", "server", "set", "--url", b.url, "--token-stdin", "--fingerprint",
                            b.fingerprint, "--public-key", f"{keyfile}.pub",
                            stdin=reader_token(b, base_env, "restore") + "\n").strip())  # fmt: skip
                os.sync()
                load = os.getloadavg()[0]  # other work on this shared machine, said in the output
                argv = ["backup", "restore-all", "--from-server", "--key", str(keyfile), "--json"]
                t = time.monotonic()
                r = run([*KASOU, *argv], env=env, timeout=RESTORE_TIMEOUT_S)
                took = time.monotonic() - t
                os.sync()  # the restored disks on the disk, as the lower bound's writes are (fsync)
                took_synced = time.monotonic() - t
                res = json.loads(r)
                order = [row["vm"] for row in res["restored"]]
                expect = [s.name for s in sorted(servers, key=lambda s: (-PRIORITY[s.criticality], s.name))]
                per_vm = [float(row["seconds"]) for row in res["restored"]]
                listed = {v["name"]: v for v in client.get("/v1/vms")}
                if sorted(listed) != sorted(expect) or any(v["state"] != "stopped" for v in listed.values()):
                    raise RuntimeError(f"not every VM is back and stopped: {sorted(listed)}")

                # -- the lower bound, same file system (the restored disks' directory), same run --------------
                written = sum(map_data(Path(d["path"])) for v in client.get("/v1/vms") for d in v["disks"])
                files = chunk_files(b.root, indexes)
                scratch = paths.disks / "bench-throughput"
                writes, copies = [], []
                stored = 0
                for _ in range(args.rounds):
                    os.sync()
                    writes.append(disk_write(scratch, written))
                    os.sync()
                    s_copy, stored = store_copy(files, scratch)
                    copies.append(s_copy)
                w_s, c_s = median(writes), median(copies)
                write_bps, copy_bps = written / w_s, stored / c_s
                bound_w, bound_c = written / write_bps, written / copy_bps
                bound = max(bound_w, bound_c)

                # -- a sample of the restored VMs started ------------------------------------------------------
                boots = []
                for name in order[: args.boot]:
                    t0 = time.monotonic()
                    job = client.post(f"/v1/vms/{name}/actions/start")["job"]
                    boots.append(wait_line(paths.logs / "serial" / f"{name}.log", READY, BOOT_TIMEOUT_S) - t0)
                    client.wait_job(job["id"], 60)

                # -- the same restore with restore-all --parallel N ------------------------------------------
                split_s = None
                if args.parallel > 1:
                    for name in order:
                        client.wait_job(client.delete(f"/v1/vms/{name}", params={"force": True})["job"]["id"], 120)
                    os.sync()
                    t = time.monotonic()
                    run([*KASOU, *argv, "--parallel", str(args.parallel)], env=env, timeout=RESTORE_TIMEOUT_S)
                    split_s = time.monotonic() - t
                    if sorted(v["name"] for v in client.get("/v1/vms")) != sorted(order):
                        raise RuntimeError("restore-all --parallel did not bring every VM back")

            print(f"\ncommand: kasou backup server set --url SITE-B --token-stdin (reader) ...; "
                  f"kasou {' '.join(argv)}")  # fmt: skip
            print(f"load average (1 min) when the restore began: {load:.2f} on {os.cpu_count()} cores")
            print(f"VMs restored: {len(order)} (stopped), in {took:.1f} s (CLI wall clock; kasou's own total "
                  f"{res['seconds']} s); {took_synced:.1f} s with the sync that puts them on the disk")  # fmt: skip
            print(f"bytes: {logical / MiB:,.0f} MiB logical, {written / MiB:,.0f} MiB of data in the restored disks "
                  f"(qemu-img map; {data / MiB:,.0f} MiB in 4 MiB chunks that are not all zero), "
                  f"{written / MiB / took:.1f} MiB/s")  # fmt: skip
            print(f"throughput here (medians of {args.rounds}): disk write (random data in 4 MiB writes, fsync, {written / MiB:,.0f} "
                  f"MiB) {write_bps / MiB:,.0f} MiB/s; store read + disk write (B's {len(files)} chunk files the "
                  f"restore reads, {stored / MiB:,.0f} MiB, into one file, fsync) {copy_bps / MiB:,.0f} MiB/s")  # fmt: skip
            print(f"lower bound: {bound:.2f} s (the larger of {bound_w:.2f} s writing the data and {bound_c:.2f} s "
                  f"reading the store and writing); kasou / lower bound = {took / bound:.1f} "
                  f"({took_synced / bound:.1f} with the sync)")  # fmt: skip
            print(f"per VM: median {median(per_vm):.1f} s (min {min(per_vm):.1f}, max {max(per_vm):.1f})")
            ok = order == expect
            print(f"restore order ({'highest priority first, then the name: as expected' if ok else 'NOT the expected'}"
                  f"): {', '.join(order)}")  # fmt: skip
            if boots:
                print("started afterwards, one after the other, to the readiness line: "
                      + ", ".join(f"{n} {s:.1f} s" for n, s in zip(order, boots, strict=False)))  # fmt: skip
            if split_s is not None:
                print(f"restore-all --parallel {args.parallel}: {split_s:.1f} s, {split_s / took:.2f} of one at a "
                      f"time ({split_s / bound:.1f} x the lower bound)")  # fmt: skip
            record.update({
                "load_average_1m": round(load, 2), "cores": os.cpu_count(), "restored": len(order), "seconds": round(took, 2), "seconds_with_sync": round(took_synced, 2),
                "kasou_seconds": res["seconds"], "bytes_logical": logical, "bytes_data": written,
                "bytes_data_chunks": data, "bytes_store_read": stored,
                "write_mib_s": round(write_bps / MiB, 1), "store_copy_mib_s": round(copy_bps / MiB, 1),
                "lower_bound_write_s": round(bound_w, 2), "lower_bound_store_copy_s": round(bound_c, 2),
                "lower_bound_s": round(bound, 2), "ratio": round(took / bound, 2),
                "ratio_with_sync": round(took_synced / bound, 2),
                "per_vm_median_s": median(per_vm), "per_vm": res["restored"], "order": order,
                "parallel": args.parallel, "parallel_seconds": None if split_s is None else round(split_s, 2),
                "priority_order_ok": ok, "boot_s": {n: round(s, 2) for n, s in zip(order, boots, strict=False)},
            })  # fmt: skip
            if not ok:
                raise RuntimeError(f"restore order {order} is not {expect}")
    finally:
        release_tree(work)  # the servers made their locked generations immutable
        shutil.rmtree(work, ignore_errors=True)
    record["whole_run_s"] = round(time.monotonic() - t_all)
    print(f"\nwhole run {record['whole_run_s']} s")
    if args.out:
        args.out.write_text(json.dumps(record, indent=2) + "\n")
        print(f"recorded in {args.out}")


if __name__ == "__main__":
    main()
