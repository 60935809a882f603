"""kasou's backup server, measured through the real parts: what a nightly copy sends, what dedup keeps, how fast.

A real backup server (``kasou backup-server init``, ``client add --role writer``, ``serve`` over HTTPS on
loopback, its own process ended by pid) and a private kasou (``kasou up``: agent and API, own KASOU_HOME)
set up the way an administrator does it: ``kasou backup key create``, ``kasou backup server set``. The VMs
stay stopped: their generations are made by the agent's ``qemu-img`` path, then copied to the backup server
by the agent (``kasou.agent.offsite``: a read-only FUSE view of the generation, 4 MiB chunks, zstd, sealed to
the site's public key, uploaded). Every backup is ``POST /v1/vms/NAME/backups``; the figures come from the
job's result (its ``offsite`` object) and from the server's data directory.

1. Dedup: 10 linked-clone desktops and 5 servers of one template made from an image (``debian`` if it is
   built, else ``tiny``), each given some data of its own (random: 8 MiB a desktop, 64 MiB a server, in
   4 MiB runs); each backed up. Stored bytes on the server (its chunks directory) / logical bytes (the sum
   of the disks' sizes) and / the bytes of the disks' data (``qemu-img map``, through the backing chain).
2. Nightly incremental of a 4 GiB disk: filled with random data (``qemu-img convert -n`` into the stopped
   VM's qcow2), a full backup, then 2 % changed (82 MiB) and an incremental backup; changes written with
   ``qemu-io write -s`` (random data, each write its own): clustered (41 runs of 2 MiB at random 2 MiB-aligned
   offsets), scattered (1312 writes of 64 KiB at random 64 KiB-aligned offsets: the worst case), and runs
   of 4 MiB at 4 MiB-aligned offsets (21 runs, 84 MiB: what chunk-aligned changes cost). Bytes changed, read,
   sent; sent / changed (target <= 1.2); the incremental copy's time / the full copy's.
3. Chunk store throughput: a 1 GiB raw image (832 MiB random, 192 MiB of holes) backed up by kasou's client
   (``kasou.vault.client.backup_disk`` + ``make_generation`` to the server over HTTPS, a new backup key each
   round so nothing is held already) vs ``restic backup`` into a new local repository vs ``cp`` + fsync,
   all on the same file system, rounds interleaved, medians and ratios. This part holds
   ``/tmp/kasou-qemu.lock`` (waiting at most 10 minutes for it): do not run the benchmark under ``flock``;
   ``--no-lock`` measures without it and says so.

    .venv/bin/python bench/backup_server.py [--desktops 10] [--servers 5] [--rounds 3] [--parts 1,2,3] [--no-lock]
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import random
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import KASOU, ensure_image, free_port, images_dir, interleave, kasou_env, median
from kasou.vault import client as vault
from kasou.vault.crypt import CHUNK_SIZE, BackupKey
from kasou.vault.immutable import release_tree

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
QEMU_LOCK = Path("/tmp/kasou-qemu.lock")
LOCK_WAIT_S = 600
JOB_TIMEOUT_S = 900
TICK = os.sysconf("SC_CLK_TCK")


def run(argv: list[str], timeout: float = 600, **kw: Any) -> str:
    """Run a command; its failure ends the benchmark with the command and its last words."""
    r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, **kw)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(argv[:6])} ... failed ({r.returncode}): {(r.stderr or r.stdout).strip()[-500:]}")
    return r.stdout


def kasou(env: dict[str, str], *args: str, stdin: str | None = None) -> str:
    return run([*KASOU, *args], env=env, input=stdin)


# -- the backup server ---------------------------------------------------------------------------------------


@dataclass
class Server:
    root: Path
    url: str
    fingerprint: str
    proc: subprocess.Popen[bytes]

    @property
    def chunks(self) -> Path:
        return self.root / "chunks"

    def cpu_s(self) -> float:
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / TICK


@contextlib.contextmanager
def backup_server(root: Path, env: dict[str, str]) -> Iterator[Server]:
    """``kasou backup-server init`` and ``serve`` on a free loopback port, ended by its pid."""
    out = kasou(env, "backup-server", "init", "--dir", str(root), "--name", "bench")
    fp = next(line.split(": ", 1)[1] for line in out.splitlines() if "fingerprint" in line)
    port = free_port()
    proc = subprocess.Popen(
        [*KASOU, "backup-server", "serve", "--dir", str(root), "--listen", f"127.0.0.1:{port}"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True,
    )  # fmt: skip
    server = Server(root, f"https://127.0.0.1:{port}", fp, proc)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    why = proc.stderr.read().decode(errors="replace") if proc.poll() is not None and proc.stderr else ""
                    why = why.strip()[-300:] or "no answer in 30 s"
                    raise RuntimeError(f"the backup server did not start: {why}") from None
                time.sleep(0.2)
        yield server
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        if proc.stderr:
            proc.stderr.close()


def writer_token(server: Server, env: dict[str, str], name: str) -> str:
    out = kasou(env, "backup-server", "client", "add", name, "--role", "writer", "--dir", str(server.root))
    return out.split("token ")[1].split()[0]


def stored(server: Server) -> tuple[int, int]:
    """Bytes and files in the server's chunks directory (each file: SHA-256 (32 bytes) + the sealed blob)."""
    size = count = 0
    for dirpath, _dirs, files in os.walk(server.chunks):
        for name in files:
            size += (Path(dirpath) / name).stat().st_size
            count += 1
    return size, count


# -- kasou: VMs, disks, backups ------------------------------------------------------------------------------


def backup(client: Any, vm: str, incremental: bool) -> dict[str, Any]:
    """``POST /v1/vms/VM/backups`` to the job's end; its result, with the copy on the backup server in it."""
    job = client.post(f"/v1/vms/{vm}/backups", json={"incremental": incremental})["job"]
    result = dict(client.wait_job(job["id"], JOB_TIMEOUT_S, interval=0.2)["result"])
    if result.get("offsite_error") or not result.get("offsite"):
        raise RuntimeError(f"generation {result['generation']} of {vm} was not copied: {result.get('offsite_error')}")
    if incremental and (result["kind"] != "incremental" or not result["offsite"]["incremental"]):
        raise RuntimeError(f"the backup of {vm} was not incremental end to end: {json.dumps(result)[:400]}")
    return result


def disk_path(client: Any, vm: str) -> Path:
    return Path(client.get(f"/v1/vms/{vm}")["disks"][0]["path"])


def data_bytes(disk: Path) -> int:
    """The bytes of data a disk holds, as the guest sees them (its backing chain included)."""
    return sum(int(e["length"]) for e in json.loads(run(["qemu-img", "map", "--output=json", "-U", str(disk)]))
               if e.get("data"))  # fmt: skip


def write_random(disk: Path, runs: list[tuple[int, int]], scratch: Path) -> None:
    """Random bytes at each (offset, length), each run its own, through ``qemu-io write -s`` on the qcow2."""
    scratch.mkdir(parents=True, exist_ok=True)
    argv = ["qemu-io", "-f", "qcow2"]
    for i, (off, length) in enumerate(runs):
        src = scratch / f"w{i:05d}"
        src.write_bytes(os.urandom(length))
        argv += ["-c", f"write -q -s {src} {off} {length}"]
    run([*argv, str(disk)], timeout=900)
    shutil.rmtree(scratch)


def fill_random(disk: Path, size: int, scratch: Path) -> None:
    """Every byte of the disk random (no two chunks alike): a raw file written here, ``qemu-img convert -n``."""
    raw = scratch / "fill.raw"
    with open(raw, "wb") as f:
        for _ in range(size // (64 * MiB)):
            f.write(os.urandom(64 * MiB))
    run(["qemu-img", "convert", "-n", "-f", "raw", "-O", "qcow2", str(raw), str(disk)], timeout=1800)
    raw.unlink()


def aligned_runs(rng: random.Random, size: int, length: int, total: int) -> list[tuple[int, int]]:
    slots = rng.sample(range(size // length), total // length)
    return [(s * length, length) for s in sorted(slots)]


def chunks_touched(runs: list[tuple[int, int]]) -> int:
    return len({c for off, n in runs for c in range(off // CHUNK_SIZE, (off + n - 1) // CHUNK_SIZE + 1)})


def mib(n: float) -> str:
    return f"{n / MiB:,.1f} MiB"


# -- 1. dedup ------------------------------------------------------------------------------------------------


def part_dedup(env: dict[str, str], client: Any, server: Server, image: str, desktops: int, servers: int,
               scratch: Path) -> None:  # fmt: skip
    print(f"\n[1] dedup: {desktops} desktops and {servers} servers, linked clones of one template from image {image!r}",
          flush=True)  # fmt: skip
    mem = "384" if image == "debian" else "128"
    kasou(env, "vm", "create", "gold", "--image", image, "--memory", mem)
    kasou(env, "vm", "template", "gold")
    rng = random.Random(11)
    vms = [(f"desk{i + 1:02d}", 8 * MiB) for i in range(desktops)] + [(f"srv{i + 1:02d}", 64 * MiB)
                                                                      for i in range(servers)]  # fmt: skip
    before, _ = stored(server)
    logical = data = 0
    results = []
    for name, own in vms:
        kasou(env, "vm", "create", name, "--from", "gold", "--memory", mem)
        disk = disk_path(client, name)
        size = int(client.get(f"/v1/vms/{name}")["disks"][0]["size_bytes"])
        write_random(disk, aligned_runs(rng, size, 4 * MiB, own), scratch / "own")
        logical += size
        data += data_bytes(disk)
        r = backup(client, name, incremental=False)
        results.append(r["offsite"])
        print(f"  {name}: {mib(own)} of its own; copy {r['offsite']['seconds']:.1f} s, "
              f"sent {mib(r['offsite']['bytes_sent'])} of {mib(r['offsite']['bytes_read'])} read", flush=True)  # fmt: skip
    after, count = stored(server)
    kept = after - before
    print(f"command: kasou vm create NAME --from gold; POST /v1/vms/NAME/backups {{}} for each (image {image}, "
          f"{len(vms)} VMs)")  # fmt: skip
    print(f"logical {logical / GiB:.1f} GiB (sum of disk sizes), data {mib(data)} (qemu-img map of each disk), "
          f"stored on the server {mib(kept)} ({count} chunk files)")  # fmt: skip
    print(f"stored / logical = {kept / logical:.4f} ({logical / kept:.0f}x less); stored / data = {kept / data:.4f} "
          f"({data / kept:.1f}x less)")  # fmt: skip
    print(f"first VM sent {mib(results[0]['bytes_sent'])}; the others a median "
          f"{mib(median([float(x['bytes_sent']) for x in results[1:]]))} each (their own data: random, so not compressed)")  # fmt: skip


# -- 2. nightly incremental ----------------------------------------------------------------------------------


def part_nightly(env: dict[str, str], client: Any, size_gib: int, scratch: Path) -> None:
    size = size_gib * GiB
    changed = -(-size // 50 // (2 * MiB)) * (2 * MiB)  # 2 %, rounded up to whole 2 MiB runs: 82 MiB of 4 GiB
    print(f"\n[2] nightly incremental: a {size_gib} GiB disk of random data, {mib(changed)} (2 %) changed", flush=True)
    kasou(env, "vm", "create", "nightly", "--image", "tiny", "--disk", f"{size_gib}G", "--memory", "128")
    disk = disk_path(client, "nightly")
    t = time.monotonic()
    fill_random(disk, size, scratch)
    print(f"  filled {disk.name} with random data in {time.monotonic() - t:.0f} s", flush=True)
    full = backup(client, "nightly", incremental=False)["offsite"]
    print("command: POST /v1/vms/nightly/backups {} (full; the copy: kasou.agent.offsite)")
    print(f"full copy: {full['seconds']:.1f} s, read {mib(full['bytes_read'])}, sent {mib(full['bytes_sent'])} "
          f"({full['bytes_read'] / MiB / full['seconds']:.0f} MiB/s)", flush=True)  # fmt: skip
    rng = random.Random(5)
    patterns = [
        ("clustered", "runs of 2 MiB at random 2 MiB-aligned offsets", aligned_runs(rng, size, 2 * MiB, changed)),
        ("scattered", "writes of 64 KiB at random 64 KiB-aligned offsets", aligned_runs(rng, size, 64 * KiB, changed)),
        ("chunk-aligned", "runs of 4 MiB at random 4 MiB-aligned offsets",
         aligned_runs(rng, size, 4 * MiB, -(-changed // (4 * MiB)) * 4 * MiB)),
    ]  # fmt: skip
    for name, how, runs in patterns:
        what = f"{name}: {len(runs)} {how}"
        n = sum(length for _, length in runs)
        touched = chunks_touched(runs)
        write_random(disk, runs, scratch / "changes")
        inc = backup(client, "nightly", incremental=True)["offsite"]
        print(f"\n  {what}")
        print("  command: qemu-io -f qcow2 -c 'write -s RANDOM OFF LEN' ... DISK; "
              "POST /v1/vms/nightly/backups {\"incremental\": true}")  # fmt: skip
        print(f"  changed {mib(n)} touching {touched} of {size // CHUNK_SIZE} chunks of 4 MiB; the incremental's copy "
              f"read {mib(inc['bytes_read'])}, sent {mib(inc['bytes_sent'])}")  # fmt: skip
        print(f"  sent / changed = {inc['bytes_sent'] / n:.2f} (target <= 1.2; floor with 4 MiB chunks: "
              f"{touched * CHUNK_SIZE / n:.2f}); read / changed = {inc['bytes_read'] / n:.2f}")  # fmt: skip
        print(f"  incremental copy {inc['seconds']:.2f} s vs full copy {full['seconds']:.2f} s: "
              f"{inc['seconds'] / full['seconds']:.3f}", flush=True)  # fmt: skip


# -- 3. chunk store throughput -------------------------------------------------------------------------------


@contextlib.contextmanager
def qemu_lock(wait: bool = True) -> Iterator[None]:
    """``/tmp/kasou-qemu.lock`` held (waiting at most 10 minutes); ``wait`` False: not taken, and said so."""
    if not wait:
        print(f"  ({QEMU_LOCK} not taken (--no-lock): other work on this machine may have run beside these rounds)")
        yield
        return
    with open(QEMU_LOCK, "a") as f:
        t = time.monotonic()
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() - t > LOCK_WAIT_S:
                    raise RuntimeError(f"{QEMU_LOCK} was held by others for {LOCK_WAIT_S} s") from None
                time.sleep(1)
        if time.monotonic() - t > 1:
            print(f"  (waited {time.monotonic() - t:.0f} s for {QEMU_LOCK})", flush=True)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def make_image(path: Path, size: int) -> int:
    """Random data with holes: 64 MiB regions, every fifth one a hole. Returns the bytes of data."""
    region = 64 * MiB
    data = 0
    with open(path, "wb") as f:
        f.truncate(size)
        for i in range(size // region):
            if i % 5 == 2:
                continue
            f.seek(i * region)
            for _ in range(region // (16 * MiB)):
                f.write(os.urandom(16 * MiB))
            data += region
    return data


def part_throughput(server: Server, token: str, work: Path, size_mib: int, rounds: int, lock: bool) -> None:
    size = size_mib * MiB
    image = work / "image.raw"
    data = make_image(image, size)
    with open(image, "rb") as f:  # into the page cache: every round reads it from memory
        while f.read(64 * MiB):
            pass
    print(f"\n[3] chunk store throughput: {image.name}, {mib(size)} ({mib(data)} random, {mib(size - data)} holes), "
          f"{rounds} rounds interleaved", flush=True)  # fmt: skip
    renv = dict(os.environ, RESTIC_PASSWORD="kasou-bench")
    cpu: dict[str, list[float]] = {"kasou": [], "restic": [], "cp": []}
    kept: dict[str, list[int]] = {"kasou": [], "restic": [], "cp": []}

    def children_cpu() -> float:
        u = resource.getrusage(resource.RUSAGE_CHILDREN)
        return u.ru_utime + u.ru_stime

    def kasou_round(i: int) -> float:
        pub = BackupKey.generate().public()  # a new key: new chunk ids, nothing held on the server yet
        os.sync()
        c0, s0, t = time.process_time(), server.cpu_s(), time.monotonic()
        with vault.VaultClient(server.url, token, fingerprint=server.fingerprint) as c:
            entry = vault.backup_disk(c, pub, "throughput", "disk0", image, size)
            vault.make_generation(c, pub, "throughput", "0" * 8 + "-0000-4000-8000-" + "0" * 12, [entry], {})
        took = time.monotonic() - t
        cpu["kasou"].append(time.process_time() - c0 + server.cpu_s() - s0)
        kept["kasou"].append(int(entry["bytes_sent"]))
        return took

    def restic_round(i: int) -> float:
        repo, cache = work / f"restic{i}", work / "restic-cache"
        run(["restic", "init", "-q", "--repo", str(repo), "--cache-dir", str(cache)], env=renv)
        os.sync()
        c0, t = children_cpu(), time.monotonic()
        run(["restic", "backup", "-q", "--repo", str(repo), "--cache-dir", str(cache), str(image)], env=renv,
            timeout=1800)  # fmt: skip
        took = time.monotonic() - t
        cpu["restic"].append(children_cpu() - c0)
        kept["restic"].append(sum(p.stat().st_size for p in repo.rglob("*") if p.is_file()))
        shutil.rmtree(repo)
        shutil.rmtree(cache, ignore_errors=True)
        return took

    def cp_round(i: int) -> float:
        dest = work / "copy.raw"
        os.sync()
        c0, t = children_cpu(), time.monotonic()
        run(["cp", str(image), str(dest)], timeout=1800)
        run(["sync", str(dest)])  # fsync the copy, as the server and restic do their files
        took = time.monotonic() - t
        cpu["cp"].append(children_cpu() - c0)
        kept["cp"].append(dest.stat().st_blocks * 512)
        dest.unlink()
        return took

    with qemu_lock(lock):
        times = interleave(rounds, {"kasou": kasou_round, "restic": restic_round, "cp": cp_round})
    for i in range(rounds):
        print("  round " + str(i + 1) + ": " + ", ".join(f"{k} {v[i]:.2f} s" for k, v in times.items()))
    m = {k: median(v) for k, v in times.items()}
    commands = {
        "kasou": f"kasou.vault.client.backup_disk + make_generation -> {server.url} (HTTPS, pinned certificate)",
        "restic": "restic backup --repo NEW_LOCAL_REPO image.raw",
        "cp": "cp image.raw copy.raw && sync copy.raw",
    }
    for k in m:
        print(f"  {k:6} median {m[k]:6.2f} s  {size / MiB / m[k]:6.0f} MiB/s of image  CPU {median(cpu[k]):5.1f} s  "
              f"stored {mib(median([float(x) for x in kept[k]]))}   command: {commands[k]}")  # fmt: skip
    print(f"  ratios of medians: kasou / cp {m['kasou'] / m['cp']:.2f}, kasou / restic {m['kasou'] / m['restic']:.2f}, "
          f"restic / cp {m['restic'] / m['cp']:.2f}")  # fmt: skip
    print("  what differs: kasou cuts fixed 4 MiB chunks, skips zero chunks, keys ids with HMAC-SHA256, compresses "
          "(zstd 3) and encrypts each chunk to a public key (X25519 + AES-256-GCM), uploads over TLS to a server that "
          "hashes and fsyncs each chunk file, in one client thread; restic cuts content-defined chunks (~1 MiB), "
          "encrypts with its repository key (AES-256-CTR + Poly1305), compresses (repository v2), writes packs "
          f"locally, on all cores ({os.cpu_count()} here); cp copies the file (holes kept) and fsyncs it. "
          "The image is in the page cache for all three.")  # fmt: skip
    image.unlink()


# -- main ----------------------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--desktops", type=int, default=10)
    ap.add_argument("--servers", type=int, default=5)
    ap.add_argument("--disk-gib", type=int, default=4)
    ap.add_argument("--image-mib", type=int, default=1024)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--parts", default="1,2,3", help="which figures to measure, e.g. 3")
    ap.add_argument("--no-lock", action="store_true", help="measure the throughput without the QEMU lock (said so)")
    args = ap.parse_args()
    parts = {int(p) for p in args.parts.split(",")}
    if shutil.which("restic") is None:
        raise SystemExit("restic is missing: run ./scripts/install.sh (it installs Debian's restic for this benchmark)")
    images = images_dir()
    if not (images / "tiny" / "manifest.json").exists():
        ensure_image()
    image = "debian" if (images / "debian" / "manifest.json").exists() else "tiny"
    t0 = time.monotonic()
    print(f"command: {' '.join([Path(sys.executable).name, *sys.argv])}")
    work = Path(tempfile.mkdtemp(prefix="kasou-bvs-", dir="/tmp"))
    try:
        with kasou_env() as (_paths, client, env), backup_server(work / "server", env) as server:
            keyfile = work / "site-backup.key"
            out = kasou(env, "backup", "key", "create", "--out", str(keyfile))
            print(out.splitlines()[0])
            token = writer_token(server, env, "hypervisors")
            print(kasou(env, "backup", "server", "set", "--url", server.url, "--token-stdin", "--fingerprint",
                        server.fingerprint, "--public-key", f"{keyfile}.pub", stdin=token + "\n").strip())  # fmt: skip
            if 1 in parts:
                part_dedup(env, client, server, image, args.desktops, args.servers, work / "scratch")
            if 2 in parts:
                part_nightly(env, client, args.disk_gib, work)
            if 3 in parts:
                part_throughput(
                    server, writer_token(server, env, "throughput"), work, args.image_mib, args.rounds, not args.no_lock
                )
    finally:
        release_tree(work)  # the server made its locked generations immutable
        shutil.rmtree(work, ignore_errors=True)
    print(f"\nwhole run {time.monotonic() - t0:.0f} s")


if __name__ == "__main__":
    main()
