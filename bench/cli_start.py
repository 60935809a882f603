"""How long a kasou command takes, against the lower bounds of a Python command doing the same request.

Every ``kasou`` command is a new Python process; a script that polls (``kasou vm show`` in a loop), shell
completion and an operator's prompt all pay its start-up. Measured side by side, interleaved, against a
private kasou on this host (``kasou up``: its own home and port):

- ``kasou vm list -o json``: the command as a script runs it;
- ``python + httpx``: a fresh interpreter that imports httpx and sends the same GET /v1/vms with the same
  token (the same request over the same transport, without kasou's CLI): the floor for a Python CLI;
- ``python``: the interpreter alone (``-c pass``).

    .venv/bin/python bench/cli_start.py [--runs 15] [--out bench/results/cli_start.json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import KASOU, interleave, kasou_env, median


def timed(argv: list[str], env: dict[str, str]) -> float:
    t0 = time.monotonic()
    r = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60)
    took = time.monotonic() - t0
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(argv[:6])} failed: {r.stderr.strip()[-300:]}")
    return took


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=15)
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()
    with kasou_env() as (paths, client, env):
        url, token = client.base_url, paths.token_file.read_text().strip()
        bare = ("import httpx, json, sys; r = httpx.get(sys.argv[1] + '/v1/vms', "
                "headers={'Authorization': 'Bearer ' + sys.argv[2]}); r.raise_for_status(); print(json.dumps(r.json()))")  # fmt: skip
        runners = {
            "kasou vm list -o json": lambda _i: timed([*KASOU, "vm", "list", "-o", "json"], env),
            "python + httpx, same GET": lambda _i: timed([sys.executable, "-c", bare, url, token], env),
            "python -c pass": lambda _i: timed([sys.executable, "-c", "pass"], env),
        }
        timed([*KASOU, "vm", "list", "-o", "json"], env)  # warm the page cache
        times = interleave(a.runs, runners)
    meds = {k: median(v) for k, v in times.items()}
    floor = meds["python + httpx, same GET"]
    print(f"{a.runs} runs each, interleaved; medians (s) and ratio to python + httpx:")
    for k, m in meds.items():
        print(f"  {k:28s} {m:6.3f}  x{m / floor:4.2f}")
    if a.out:
        a.out.write_text(json.dumps({"runs": a.runs, "median_s": meds, "all_s": times}, indent=2) + "\n")
        print(f"written to {a.out}")


if __name__ == "__main__":
    main()
