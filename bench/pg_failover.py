"""HA failover of a PostgreSQL database VM on a 3-host lab, under a steady insert load: nothing committed is lost.

The guest is kasou's ``debian`` image (PostgreSQL 15 inside), on shared storage with ``--ha``, on network
``clinical`` with the address 192.168.10.10 given by cloud-init, whose user-data makes PostgreSQL listen
on that network. The client runs outside the guest, on the lab's VM network (a namespace ``klab-pgc`` with a
veth on the lab's VM bridge, 192.168.10.250): one ``psql`` session that commits one row at a time
(``INSERT … RETURNING``, autocommit, ``synchronous_commit=on``: a row whose id psql printed is committed).

Each run kills the host the VM runs on (``kasou lab kill``: its QEMU and agent die, as at a power loss), HA
restarts the VM on another host, PostgreSQL recovers from its WAL, and the client reconnects. Per run:
the time from the kill to the first new commit, and committed-and-lost (the ids the client saw committed
that are not in the table after the failover), which must be 0. Prints each run, the median and the worst.

    .venv/bin/python bench/pg_failover.py [--runs 5]
"""

# ruff: noqa: B023 - the lambdas are awaited at once, inside the loop

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import KASOU, images_dir, lab_env, median

VM = "emr-db"
NET = "clinical"
VM_IP = "192.168.10.10"
CLIENT_NS = "klab-pgc"
CLIENT_IP = "192.168.10.250"
LAB_VM_BRIDGE = "klab-vm"
COMMIT_TIMEOUT_S = 420.0  # from the kill to a commit on the restarted database
BOOT_TIMEOUT_S = 900  # the debian image's first boot (cloud-init, PostgreSQL's first start) under TCG
USER_DATA = """#cloud-config
runcmd:
  - [sh, -c, "echo \\"listen_addresses = '*'\\" >> /etc/postgresql/15/main/postgresql.conf"]
  - [sh, -c, "echo 'host all all 192.168.10.0/24 trust' >> /etc/postgresql/15/main/pg_hba.conf"]
  - [systemctl, enable, --now, postgresql]
  - [sh, -c, "until pg_isready -q; do sleep 1; done; su postgres -c \\"psql -qc 'CREATE TABLE IF NOT EXISTS orders (id bigint PRIMARY KEY)'\\""]
  - [sh, -c, "echo KASOU-PG-READY > /dev/ttyS0"]
"""


def psql(*args: str, timeout: float = 10) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["ip", "netns", "exec", CLIENT_NS, "psql", "-h", VM_IP, "-U", "postgres", "-At", "-v", "ON_ERROR_STOP=1",
         "-c", *args],
        capture_output=True, text=True, timeout=timeout, env=dict(os.environ, PGCONNECT_TIMEOUT="2"),
    )  # fmt: skip


def client_network_up() -> None:
    """The client's namespace on the lab's VM bridge (untagged: network clinical has no VLAN)."""
    client_network_down()
    for cmd in (["ip", "netns", "add", CLIENT_NS],
                ["ip", "link", "add", "kpgc0", "type", "veth", "peer", "name", "kpgc1"],
                ["ip", "link", "set", "kpgc0", "master", LAB_VM_BRIDGE, "up"],
                ["ip", "link", "set", "kpgc1", "netns", CLIENT_NS],
                ["ip", "-n", CLIENT_NS, "addr", "add", f"{CLIENT_IP}/24", "dev", "kpgc1"],
                ["ip", "-n", CLIENT_NS, "link", "set", "kpgc1", "up"],
                ["ip", "-n", CLIENT_NS, "link", "set", "lo", "up"]):  # fmt: skip
        subprocess.run(cmd, check=True, capture_output=True, timeout=10)


def client_network_down() -> None:
    subprocess.run(["ip", "link", "del", "kpgc0"], capture_output=True, timeout=10)
    subprocess.run(["ip", "netns", "del", CLIENT_NS], capture_output=True, timeout=10)


class Load:
    """Commits ids one at a time, each sent when the one before was answered, as an application does: each a
    ``psql -c`` of its own (a connection per commit, as a client pool that reconnects would see it). ``acked``
    are the ids psql printed back: committed. A commit not answered within ``ANSWER_TIMEOUT_S`` (its host
    died) ends the load: the client then retries until the restarted database commits (see ``main``)."""

    ANSWER_TIMEOUT_S = 10.0  # a commit under TCG on a loaded machine can take seconds

    def __init__(self, start: int) -> None:
        self.next = start
        self.acked: list[int] = []

    def commit_one(self) -> bool:
        """Commit the next id and wait for its answer (False: the database did not answer)."""
        sent = self.next
        self.next += 1
        try:
            r = psql(f"INSERT INTO orders VALUES ({sent}) RETURNING id", timeout=self.ANSWER_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            return False
        if r.returncode != 0 or r.stdout.split()[:1] != [str(sent)]:
            return False
        self.acked.append(sent)
        return True


def wait(what: str, cond, timeout: float = 180, every: float = 0.2):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = cond()
        if v:
            return v
        time.sleep(every)
    raise SystemExit(f"timed out after {timeout:.0f} s waiting for {what}")


def main() -> None:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so that the lab is taken down
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--out", type=Path, help="also write the figures here (JSON)")
    ap.add_argument("--hold", type=float, default=0, help="on a failure, keep the lab this many seconds to look at")
    args = ap.parse_args()
    if not (images_dir() / "debian" / "manifest.json").is_file():
        subprocess.run([*KASOU, "image", "build", "debian"], check=True, timeout=2700)
    lab_dir = Path(tempfile.mkdtemp(prefix="kasou-bench-pg-", dir="/tmp"))
    base = dict(os.environ, KASOU_LAB_DIR=str(lab_dir))
    work = Path(tempfile.mkdtemp(prefix="kasou-bench-pgw-", dir="/tmp"))
    rows: list[dict[str, float]] = []
    lost_total = 0
    try:
        subprocess.run([*KASOU, "lab", "up", "--hosts", "3"], env=base, check=True, capture_output=True, timeout=180)

        def kasou(via: str, *a: str, timeout: float = 600) -> str:
            r = subprocess.run([*KASOU, *a], env=lab_env(base, via), capture_output=True, text=True, timeout=timeout)
            if r.returncode != 0:
                raise SystemExit(f"kasou {' '.join(a)}: {r.stderr.strip()}")
            return r.stdout

        def vm() -> dict[str, object]:
            return dict(json.loads(kasou(leader(), "vm", "show", VM, "--json")))

        down: set[str] = set()  # the host killed and not yet revived: not asked

        def alive() -> str:
            return next(h for h in ("h1", "h2", "h3") if h not in down)

        def leader() -> str:
            return str(json.loads(kasou(alive(), "cluster", "--json"))["leader"])

        (work / "user-data").write_text(USER_DATA)
        wait("the lab's agents", lambda: len(json.loads(kasou("h1", "host", "list", "--json"))) == 3, 60)
        kasou("h1", "network", "create", NET)
        kasou("h1", "vm", "create", VM, "--image", "debian", "--memory", "1024", "--shared", "--ha", "--network",
              NET, "--ip", f"{VM_IP}/24", "--user-data", str(work / "user-data"), "--start")  # fmt: skip
        client_network_up()
        t0 = time.monotonic()
        # its table exists: the user-data made it (the database answers a little before)
        wait(
            "PostgreSQL on the VM", lambda: psql("SELECT count(*) FROM orders").returncode == 0, BOOT_TIMEOUT_S, every=2
        )
        print(f"first boot with cloud-init to PostgreSQL answering: {time.monotonic() - t0:.0f} s", flush=True)
        next_id = 1
        for i in range(args.runs):
            lead = leader()
            victim = str(vm()["host"])
            if victim == lead:  # the leader's host is never the one killed: this measures a host failure
                victim = next(h for h in ("h1", "h2", "h3") if h != lead)
                kasou(lead, "vm", "migrate", VM, "--to", victim)
                wait("PostgreSQL after the migration", lambda: psql("SELECT 1").returncode == 0, 120, every=1)
            load = Load(next_id)
            t_load = time.monotonic()
            while time.monotonic() - t_load < 5.0:  # a steady load before the kill
                if not load.commit_one():
                    r = psql("SELECT count(*) FROM orders")
                    raise SystemExit(f"the insert load failed before the kill (psql: {r.stdout.strip()} "
                                     f"{r.stderr.strip()[-300:]})")  # fmt: skip
            t_kill = time.monotonic()
            subprocess.run([*KASOU, "lab", "kill", victim], env=base, check=True, capture_output=True, timeout=60)
            down.add(victim)
            while load.commit_one():  # commits answered until the session breaks
                if time.monotonic() - t_kill > 60:
                    raise SystemExit("the database kept answering 60 s after its host was killed")
            acked = list(load.acked)
            next_id = load.next + 1
            first: float | None = None
            deadline = time.monotonic() + COMMIT_TIMEOUT_S
            while time.monotonic() < deadline:  # reconnect and commit: the first new commit after the kill
                r = psql(f"INSERT INTO orders VALUES ({next_id}) RETURNING id", timeout=10)
                if r.returncode == 0 and r.stdout.split()[:1] == [str(next_id)]:  # then psql's "INSERT 0 1"
                    first = time.monotonic()
                    next_id += 1
                    break
                time.sleep(0.2)
            if first is None:
                lead = leader()
                print(kasou(lead, "vm", "show", VM), file=sys.stderr)
                print(kasou(lead, "job", "list"), file=sys.stderr)
                print(kasou(lead, "event", "list"), file=sys.stderr)
                for log in sorted(lab_dir.glob(f"h*/home/log/serial/{VM}.log")):
                    print(f"--- {log}\n" + log.read_text(errors="replace")[-1500:], file=sys.stderr)
                raise SystemExit(f"no commit within {COMMIT_TIMEOUT_S:.0f} s of the kill")
            present = {int(x) for x in psql("SELECT id FROM orders", timeout=30).stdout.split()}
            lost = sorted(set(acked) - present)
            lost_total += len(lost)
            new_host = str(vm()["host"])
            row = {"to_first_commit": first - t_kill, "acked": float(len(acked)), "lost": float(len(lost))}
            rows.append(row)
            print(f"run {i + 1}: {victim} killed -> {new_host}: first new commit after {row['to_first_commit']:.1f} s; "
                  f"{len(acked)} commits seen before the kill, lost {len(lost)}{' ' + str(lost[:10]) if lost else ''}",
                  flush=True)  # fmt: skip
            subprocess.run([*KASOU, "lab", "revive", victim], env=base, check=True, capture_output=True, timeout=180)
            wait(f"{victim} up", lambda: any(h["name"] == victim and h["state"] == "up"
                                             for h in json.loads(kasou(alive(), "host", "list", "--json"))), 120)  # fmt: skip
            down.discard(victim)
        times = [r["to_first_commit"] for r in rows]
        print(f"\nPostgreSQL HA failover, {len(rows)} host kills under an insert load: first new commit after a "
              f"median {median(times):.1f} s (worst {max(times):.1f} s); committed and lost: {lost_total}")  # fmt: skip
        if args.out:
            args.out.write_text(json.dumps({"bench": "bench/pg_failover.py", "runs": rows,
                                            "median_to_first_commit_s": median(times), "lost": lost_total},
                                           indent=1) + "\n")  # fmt: skip
        if lost_total:
            raise SystemExit(f"{lost_total} committed transactions were lost")
    except BaseException:
        for log in sorted(lab_dir.glob("h*/log/*.log")):  # what the hosts said, for the failure above
            text = log.read_text(errors="replace")
            if "Traceback" in text:
                print(f"--- {log}\n" + text[text.rfind("Traceback") - 2000 :][:6000], file=sys.stderr)
        if args.hold:
            print(f"holding the lab for {args.hold:.0f} s: KASOU_LAB_DIR={lab_dir}", file=sys.stderr, flush=True)
            time.sleep(args.hold)
        raise
    finally:
        client_network_down()
        subprocess.run([*KASOU, "lab", "down"], env=base, capture_output=True, timeout=180)
        shutil.rmtree(lab_dir, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
