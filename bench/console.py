"""The web console: "open console" click to the first frame in the browser, and the API server's memory with
20 consoles open at once.

A private kasou runs two tiny guests. An operator signs in to the dashboard in Debian's Chromium (Playwright,
headless) and clicks a VM's "console" link, again and again: the time from the click to the first frame drawn
on noVNC's canvas (a pixel that is not black), split into page + ticket, websocket + RFB handshake, and the
first screen update. Then 20 websocket clients (Python, RFB 3.8, shared sessions, each asking for screen
updates and reading them) open consoles on the two VMs through the API server's proxy; the resident memory of
the API server (and of the agent, which pipes the same bytes) with none open and with 20 open.

    flock /tmp/kasou-qemu.lock .venv/bin/python bench/console.py [--runs 7] [--consoles 20]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import struct
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import ensure_image, follow, kasou_env, median, rss_mib

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run", "--disable-dev-shm-usage"]  # fmt: skip
PASSWORD = "bench-password-1"
VMS = ("cb1", "cb2")


def wait_ready(api: httpx.Client, vm: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if api.get(f"/v1/vms/{vm}").json().get("guest_ready"):
            return
        time.sleep(0.5)
    raise SystemExit(f"{vm} did not become ready")


def click_to_frame(base: str, runs: int) -> list[dict[str, float]]:
    from playwright.sync_api import sync_playwright

    profile = tempfile.mkdtemp(prefix="kasou-bench-chromium-", dir="/tmp")
    out = []
    try:
        with sync_playwright() as pw:
            ctx = pw.chromium.launch_persistent_context(
                profile, executable_path=CHROMIUM, headless=True, args=ARGS, viewport={"width": 1280, "height": 800}
            )
            try:
                page = ctx.pages[0] if ctx.pages else ctx.new_page()
                page.set_default_timeout(60_000)
                page.goto(f"{base}/ui/?lang=en")
                page.fill("#user", "opbench")
                page.fill("#password", PASSWORD)
                page.click("#signin button[type=submit]")
                page.wait_for_selector("#signout", state="visible")  # signed in: the dashboard is up
                for i in range(runs):
                    vm = VMS[i % len(VMS)]
                    page.goto(f"{base}/ui/?lang=en")
                    link = page.locator(f'[data-key="console:{vm}"]')
                    link.wait_for()
                    t0 = time.time()
                    link.click()
                    page.wait_for_selector("body[data-state=drawn]")
                    m = page.evaluate(
                        "({origin: performance.timeOrigin, ...window.kasouConsole})"
                    )  # ms since the console page's navigation began
                    frame = (m["origin"] + m["firstFrameAt"]) / 1000 - t0
                    out.append({
                        "click_to_frame": frame,
                        "click_to_ticket": (m["origin"] + m["ticketAt"]) / 1000 - t0,
                        "ticket_to_connected": (m["connectedAt"] - m["ticketAt"]) / 1000,
                        "connected_to_frame": (m["firstFrameAt"] - m["connectedAt"]) / 1000,
                    })  # fmt: skip
                    print(f"  run {i + 1}: {vm} click -> first frame {frame * 1000:.0f} ms", flush=True)
            finally:
                ctx.close()
    finally:
        shutil.rmtree(profile, ignore_errors=True)
    return out


async def rfb_client(base: str, token: str, vm: str, ready: asyncio.Event, stop: asyncio.Event) -> int:
    """One console: a ticket, the websocket, an RFB 3.8 handshake, then screen updates read until stopped."""
    from websockets.asyncio.client import connect

    auth = {"Authorization": f"Bearer {token}"}
    async with httpx.AsyncClient(base_url=base, headers=auth, timeout=30) as api:
        r = await api.post(f"/v1/vms/{vm}/console-ticket")
        r.raise_for_status()
        url = "ws://" + base.split("://", 1)[1] + r.json()["url"]
    got = 0
    async with connect(url, additional_headers=auth, max_size=None, open_timeout=30) as ws:
        assert (await ws.recv()) == b"RFB 003.008\n"
        await ws.send(b"RFB 003.008\n")
        await ws.recv()  # security types
        await ws.send(b"\x01")
        await ws.recv()  # security result
        await ws.send(b"\x01")  # shared
        init = await ws.recv()
        w, h = struct.unpack(">HH", init[:4])
        await ws.send(struct.pack(">BBHHHH", 3, 0, 0, 0, w, h))
        ready.set()
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                data = await asyncio.wait_for(ws.recv(), 0.5)
                got += len(data)
                await ws.send(struct.pack(">BBHHHH", 3, 1, 0, 0, w, h))  # incremental: what changed next
    return got


async def many_consoles(base: str, token: str, n: int, api_pid: int, agent_pid: int) -> dict[str, float]:
    stop = asyncio.Event()
    readies = [asyncio.Event() for _ in range(n)]
    tasks = [asyncio.create_task(rfb_client(base, token, VMS[i % len(VMS)], readies[i], stop)) for i in range(n)]
    try:
        await asyncio.wait_for(asyncio.gather(*(e.wait() for e in readies)), 120)
        await asyncio.sleep(5)  # a few seconds of updates through every console
        api_rss, agent_rss = rss_mib(api_pid), rss_mib(agent_pid)
    finally:
        stop.set()
        received = await asyncio.gather(*tasks, return_exceptions=True)
    errors = [r for r in received if isinstance(r, BaseException)]
    if errors:
        raise SystemExit(f"{len(errors)} console(s) failed: {errors[0]!r}")
    return {"api": api_rss, "agent": agent_rss, "bytes": float(sum(r for r in received if isinstance(r, int)))}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--consoles", type=int, default=20)
    args = ap.parse_args()
    if not Path(CHROMIUM).exists():
        raise SystemExit("Debian's chromium is needed: ./scripts/install.sh")
    ensure_image()
    with kasou_env() as (paths, _client, env):
        base = "http://" + env["KASOU_API"]
        token = paths.token_file.read_text().strip()
        api = httpx.Client(base_url=base, headers={"Authorization": f"Bearer {token}"}, timeout=120)
        for vm in VMS:
            r = api.post("/v1/vms", json={"name": vm, "image": "tiny", "vcpus": 1, "memory_mib": 128, "start": True})
            r.raise_for_status()
            follow(api, r.json()["job"], 180)
        for vm in VMS:
            wait_ready(api, vm)
        r = api.post("/v1/users", json={"name": "opbench", "role": "operator", "password": PASSWORD})
        r.raise_for_status()
        api_pid = int(paths.pidfile("api").read_text())
        agent_pid = int(paths.pidfile("agent").read_text())

        print(f"console: click on 'console' in the dashboard -> first frame on noVNC's canvas ({args.runs} runs)")
        runs = click_to_frame(base, args.runs)
        for key in ("click_to_frame", "click_to_ticket", "ticket_to_connected", "connected_to_frame"):
            xs = [r[key] for r in runs]
            print(
                f"  {key:<20} median {median(xs) * 1000:6.0f} ms   min {min(xs) * 1000:6.0f}   max {max(xs) * 1000:6.0f}"
            )

        time.sleep(2)
        idle_api, idle_agent = rss_mib(api_pid), rss_mib(agent_pid)
        print(f"memory with {args.consoles} consoles open at once ({len(VMS)} VMs, Python RFB clients):")
        m = asyncio.run(many_consoles(base, token, args.consoles, api_pid, agent_pid))
        print(f"  API server RSS: none open {idle_api:.1f} MiB, {args.consoles} open {m['api']:.1f} MiB "
              f"(+{m['api'] - idle_api:.1f} MiB, {(m['api'] - idle_api) / args.consoles * 1024:.0f} KiB per console)")  # fmt: skip
        print(f"  agent RSS:      none open {idle_agent:.1f} MiB, {args.consoles} open {m['agent']:.1f} MiB")
        print(f"  screen bytes through the proxy in 5 s: {m['bytes'] / 1e6:.1f} MB")
        api.close()


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
