"""What recording a console costs: the console proxy's added latency and the API server's CPU per MB proxied,
with recording on and off, side by side in one run.

A private kasou runs one desktop (a tiny guest, the only desktop of a pool) and a clinician has it; the pool's
``record`` setting is switched between rounds (``PATCH /v1/desktop-pools/P``), so the same user, VM and code
path are measured both ways (staff's consoles are always recorded: the pool is how a console goes unrecorded).
Each round opens a console through the API's websocket proxy (a Python RFB 3.8 client, raw encoding) and:

* latency: a FramebufferUpdateRequest (non-incremental, 64x16 pixels) to QEMU's first answer (with the
  ExtendedDesktopSize encoding QEMU answers such a request at once with the desktop's size; its pixels follow
  at its display refresh, about 150 ms under TCG, which would hide the proxy), ``--pings`` times; also
  straight to QEMU's VNC socket (no proxy), so the proxy's own share is the difference;
* CPU: full-screen non-incremental updates as fast as they come for ``--seconds``; the API server's CPU time
  (utime + stime from /proc) divided by the MB that went through.

Rounds alternate (on, off, off, on, ...) so that drift hits both alike. Figures are medians over rounds; the
result goes to ``bench/results/console_recording.json``.

    flock /tmp/kasou-qemu.lock .venv/bin/python bench/console_recording.py [--rounds 6] [--pings 200] [--seconds 4]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import struct
import sys
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import ensure_image, follow, kasou_env, median

RESULT = Path(__file__).resolve().parent / "results" / "console_recording.json"
PASSWORD = "bench-password-1"
POOL = "rb"
CSRF = {"x-kasou-csrf": "1"}


def cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Rfb:
    """A minimal RFB 3.8 client over a websocket (the proxy) or a unix socket (QEMU directly)."""

    def __init__(self, recv: Any, send: Any) -> None:
        self.recv_raw, self.send = recv, send
        self.buf = bytearray()
        self.w = self.h = 0

    async def read(self, n: int) -> bytes:
        while len(self.buf) < n:
            self.buf += await self.recv_raw()
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out

    async def handshake(self) -> None:
        await self.read(12)
        await self.send(b"RFB 003.008\n")
        (n,) = await self.read(1)
        await self.read(n)
        await self.send(b"\x01")
        await self.read(4)
        await self.send(b"\x01")  # shared
        init = await self.read(24)
        self.w, self.h = struct.unpack(">HH", init[:4])
        await self.read(struct.unpack(">I", init[20:24])[0])
        # raw only (the most bytes per screen), and ExtendedDesktopSize: QEMU then answers a non-incremental
        # update request at once with a desktop-size message (before the pixels, which wait for its refresh timer)
        await self.send(struct.pack(">BxHii", 2, 2, 0, -308))

    async def message(self) -> tuple[int, bool]:
        """One FramebufferUpdate (bells skipped): its bytes, and whether it held pixels."""
        while True:
            kind = (await self.read(1))[0]
            if kind == 0:
                break
            if kind != 2:  # 2: bell
                raise SystemExit(f"unexpected server message {kind}")
        (_, n) = struct.unpack(">BH", await self.read(3))
        got, pixels = 4, False
        for _ in range(n):
            _x, _y, rw, rh, enc = struct.unpack(">HHHHi", await self.read(12))
            got += 12
            if enc == 0:
                await self.read(rw * rh * 4)
                got, pixels = got + rw * rh * 4, True
            elif enc == -308:  # ExtendedDesktopSize: u8 screens, 3 pad, 16 bytes a screen
                screens = (await self.read(4))[0]
                await self.read(16 * screens)
                got += 4 + 16 * screens
            else:
                raise SystemExit(f"unexpected encoding {enc}")
        return got, pixels

    async def update(self, x: int, y: int, w: int, h: int) -> tuple[int, float]:
        """A non-incremental update of the rectangle: the bytes of the answer, and the seconds to its first
        message (QEMU's immediate desktop-size answer: the round trip through everything but QEMU's timer)."""
        t0 = time.perf_counter()
        await self.send(struct.pack(">BBHHHH", 3, 0, x, y, w, h))
        got, pixels = await self.message()
        first = time.perf_counter() - t0
        while not pixels:
            more, pixels = await self.message()
            got += more
        return got, first


async def measure(rfb: Rfb, pings: int, seconds: float, api_pid: int | None) -> dict[str, float]:
    await rfb.handshake()
    for _ in range(3):
        await rfb.update(0, 0, 64, 16)
    firsts, wholes = [], []
    for _ in range(pings):
        t0 = time.perf_counter()
        _, first = await rfb.update(0, 0, 64, 16)
        wholes.append(time.perf_counter() - t0)
        firsts.append(first)
    out = {"rtt_ms": median(firsts) * 1000, "update_ms": median(wholes) * 1000}
    if api_pid is not None:
        c0, t0, nbytes = cpu_s(api_pid), time.monotonic(), 0
        while time.monotonic() - t0 < seconds:
            nbytes += (await rfb.update(0, 0, rfb.w, rfb.h))[0]
        out["cpu_s_per_mb"] = (cpu_s(api_pid) - c0) / (nbytes / 1e6)
        out["mb_per_s"] = nbytes / 1e6 / (time.monotonic() - t0)
    return out


async def through_proxy(base: str, cookie: str, vm: str, pings: int, seconds: float, api_pid: int) -> dict[str, float]:
    from websockets.asyncio.client import connect

    async with httpx.AsyncClient(base_url=base, timeout=30) as api:
        r = await api.post(f"/v1/vms/{vm}/console-ticket", headers={"cookie": cookie, **CSRF})
        r.raise_for_status()
        url = "ws://" + base.split("://", 1)[1] + r.json()["url"]
    async with connect(url, additional_headers={"cookie": cookie}, max_size=None, open_timeout=30) as ws:

        async def recv() -> bytes:
            data = await ws.recv()
            return data if isinstance(data, bytes) else data.encode()

        return await measure(Rfb(recv, ws.send), pings, seconds, api_pid)


async def direct(sock: Path, pings: int) -> dict[str, float]:
    reader, writer = await asyncio.open_unix_connection(str(sock))

    async def recv() -> bytes:
        data = await reader.read(65536)
        if not data:
            raise SystemExit("QEMU closed the VNC socket")
        return data

    async def send(b: bytes) -> None:
        writer.write(b)
        await writer.drain()

    try:
        return await measure(Rfb(recv, send), pings, 0, None)
    finally:
        writer.close()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--pings", type=int, default=200)
    ap.add_argument("--seconds", type=float, default=4.0)
    ap.add_argument("--out", type=Path, default=RESULT)
    args = ap.parse_args()
    ensure_image()
    with kasou_env() as (paths, _client, env):
        base = "http://" + env["KASOU_API"]
        token = paths.token_file.read_text().strip()
        api = httpx.Client(base_url=base, headers={"Authorization": f"Bearer {token}"}, timeout=120)
        r = api.post("/v1/vms", json={"name": "rbase", "image": "tiny", "vcpus": 1, "memory_mib": 128})
        r.raise_for_status()
        follow(api, r.json()["job"], 300)
        api.post("/v1/vms/rbase/template").raise_for_status()
        r = api.post("/v1/desktop-pools", json={"name": POOL, "template": "rbase", "size": 1, "prestart": 1})
        r.raise_for_status()
        follow(api, r.json()["job"], 300)
        api.post("/v1/users", json={"name": "dr-bench", "role": "clinician", "password": PASSWORD,
                                    "pools": [POOL]}).raise_for_status()  # fmt: skip
        with httpx.Client(base_url=base, timeout=60) as s:
            s.post("/v1/auth/login", json={"name": "dr-bench", "password": PASSWORD}).raise_for_status()
            cookie = f"kasou_session={s.cookies['kasou_session']}"
        r = httpx.post(base + "/v1/portal/desktop", json={"pool": POOL}, headers={"cookie": cookie, **CSRF}, timeout=60)
        r.raise_for_status()
        vm = r.json()["vm"]
        deadline = time.monotonic() + 180
        while not api.get(f"/v1/vms/{vm}").json().get("guest_ready"):
            if time.monotonic() > deadline:
                raise SystemExit(f"{vm} did not become ready")
            time.sleep(0.5)
        api_pid = int(paths.pidfile("api").read_text())
        sock = paths.vm_run / vm / "vnc.sock"
        print(f"console recording: {args.rounds} rounds of {args.pings} update round trips and {args.seconds:.0f} s "
              f"of full screens (raw), desktop {vm}, on/off alternating", flush=True)  # fmt: skip
        results: dict[str, list[dict[str, float]]] = {"on": [], "off": [], "direct": []}
        for i in range(args.rounds):
            for mode in ("on", "off") if i % 2 == 0 else ("off", "on"):
                api.patch(f"/v1/desktop-pools/{POOL}", json={"record": mode == "on"}).raise_for_status()
                m = asyncio.run(through_proxy(base, cookie, vm, args.pings, args.seconds, api_pid))
                results[mode].append(m)
                print(f"  round {i + 1} recording {mode:<3}: round trip {m['rtt_ms']:6.2f} ms "
                      f"(whole update {m['update_ms']:6.1f} ms), "
                      f"API CPU {m['cpu_s_per_mb'] * 1000:6.1f} ms/MB at {m['mb_per_s']:5.1f} MB/s", flush=True)  # fmt: skip
            if sock.exists():
                with_direct = asyncio.run(direct(sock, args.pings))
                results["direct"].append(with_direct)
        recs = api.get("/v1/recordings").json()
        api.close()
    on_rtt = median([m["rtt_ms"] for m in results["on"]])
    off_rtt = median([m["rtt_ms"] for m in results["off"]])
    on_cpu = median([m["cpu_s_per_mb"] for m in results["on"]])
    off_cpu = median([m["cpu_s_per_mb"] for m in results["off"]])
    direct_rtt = median([m["rtt_ms"] for m in results["direct"]]) if results["direct"] else float("nan")
    on_upd = median([m["update_ms"] for m in results["on"]])
    off_upd = median([m["update_ms"] for m in results["off"]])
    sealed = sum(r["size"] for r in recs)
    plain = sum(r["plain_bytes"] for r in recs)
    print(f"update round trip (median): direct to QEMU {direct_rtt:.2f} ms, through the proxy: recording off "
          f"{off_rtt:.2f} ms, on {on_rtt:.2f} ms; on/off = {on_rtt / off_rtt:.2f}; the proxy adds "
          f"{off_rtt - direct_rtt:.2f} ms (off) / {on_rtt - direct_rtt:.2f} ms (on)")  # fmt: skip
    print(f"whole 64x16 update (QEMU's refresh timer included): off {off_upd:.1f} ms, on {on_upd:.1f} ms; "
          f"on/off = {on_upd / off_upd:.3f}")  # fmt: skip
    print(f"API server CPU per MB proxied (median): off {off_cpu * 1000:.1f} ms, on {on_cpu * 1000:.1f} ms; "
          f"on/off = {on_cpu / off_cpu:.2f}")  # fmt: skip
    print(f"recordings: {len(recs)} ({sum(1 for r in recs if r['state'] == 'complete')} complete), "
          f"{plain / 1e6:.1f} MB of events sealed into {sealed / 1e6:.1f} MB")  # fmt: skip
    out = {
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "host": socket.gethostname(),
        "rounds": args.rounds, "pings": args.pings, "seconds": args.seconds,
        "rtt_ms": {"direct": direct_rtt, "off": off_rtt, "on": on_rtt}, "rtt_ratio_on_off": on_rtt / off_rtt,
        "proxy_added_ms": {"off": off_rtt - direct_rtt, "on": on_rtt - direct_rtt},
        "update_ms": {"off": off_upd, "on": on_upd},
        "api_cpu_ms_per_mb": {"off": off_cpu * 1000, "on": on_cpu * 1000}, "cpu_ratio_on_off": on_cpu / off_cpu,
        "recordings": len(recs), "plain_mb": plain / 1e6, "sealed_mb": sealed / 1e6, "runs": results,
    }  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(f"recorded in {args.out}")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
