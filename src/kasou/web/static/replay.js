// Console recordings (auditors and administrators): without ?id= the list, with ?id= a player.
// The player fetches the recording's checked, decrypted events (/v1/recordings/{id}/stream) and plays the
// server's bytes into noVNC through a fake websocket (an object with a websocket's properties, as noVNC's own
// tests play recorded sessions); the client's messages are not replayed. Seeking forward feeds the events up to
// that point at once; seeking back starts a new noVNC and replays from the start quickly. A serial console's
// recording plays as text. For tests: body[data-state] is loading|list|ready|playing|paused|ended|refused, and
// window.kasouReplay holds { position, duration, fed } (milliseconds, events fed).
import RFB from "/ui/novnc/core/rfb.js";
import { ApiError, get } from "/ui/api.js";
import { extend, switchLang, t, translate } from "/ui/i18n.js";

extend({
  ja: {
    "replay.title": "コンソール記録",
    "replay.play": "再生",
    "replay.pause": "一時停止",
    "replay.speed": "速度",
    "replay.export": "エクスポート（調査用）",
    "replay.list": "記録の一覧",
    "replay.back": "戻る",
    "replay.loading": "記録を読み込んでいます…",
    "replay.ready": "{vm} のコンソール: {user}（{role}）、{started} から {minutes} 分。記録は検証済みです。",
    "replay.none": "記録はまだありません。",
    "replay.forbidden": "記録を見る権限がありません（監査担当者と管理者のみ）。",
    "replay.signin": "サインインしてください。",
    "replay.failed": "記録を開けませんでした: {message}",
    "replay.col.started": "開始",
    "replay.col.vm": "仮想マシン",
    "replay.col.user": "利用者",
    "replay.col.kind": "種類",
    "replay.col.window": "保守作業枠",
    "replay.col.minutes": "分",
    "replay.col.size": "サイズ",
    "replay.col.state": "状態",
    "replay.open": "再生",
  },
  en: {
    "replay.title": "Console recordings",
    "replay.play": "Play",
    "replay.pause": "Pause",
    "replay.speed": "Speed",
    "replay.export": "Export (investigation)",
    "replay.list": "All recordings",
    "replay.back": "Back",
    "replay.loading": "Loading the recording…",
    "replay.ready": "Console of {vm}: {user} ({role}), {minutes} min from {started}. The recording was verified.",
    "replay.none": "No recordings yet.",
    "replay.forbidden": "You may not view recordings (auditors and administrators only).",
    "replay.signin": "Please sign in.",
    "replay.failed": "Could not open the recording: {message}",
    "replay.col.started": "Started",
    "replay.col.vm": "VM",
    "replay.col.user": "User",
    "replay.col.kind": "Kind",
    "replay.col.window": "Window",
    "replay.col.minutes": "Minutes",
    "replay.col.size": "Size",
    "replay.col.state": "State",
    "replay.open": "Replay",
  },
});

const $ = (id) => document.getElementById(id);
const id = new URLSearchParams(location.search).get("id");
const state = (window.kasouReplay = { position: 0, duration: 0, fed: 0 });

function status(s, key, vars, bad = false) {
  document.body.dataset.state = s;
  $("status").textContent = key ? t(key, vars) : "";
  $("status").classList.toggle("bad", bad);
}

function refused(e) {
  if (e instanceof ApiError && e.status === 401) return status("refused", "replay.signin", {}, true);
  if (e instanceof ApiError && e.status === 403) return status("refused", "replay.forbidden", {}, true);
  status("refused", "replay.failed", { message: e.message }, true);
}

const when = (s) => new Date(s * 1000).toLocaleString();
const mmss = (ms) => {
  const s = Math.floor(ms / 1000);
  return `${Math.floor(s / 60)}:${String(s % 60).padStart(2, "0")}`;
};

// -- the list -------------------------------------------------------------------------------------------

async function showList() {
  const recs = await get("/v1/recordings");
  const box = $("recordings");
  box.hidden = false;
  if (!recs.length) return status("list", "replay.none");
  status("list", null);
  const table = document.createElement("table");
  const head = table.createTHead().insertRow();
  for (const k of ["started", "vm", "user", "kind", "window", "minutes", "size", "state"]) {
    const th = document.createElement("th");
    th.textContent = t(`replay.col.${k}`);
    head.appendChild(th);
  }
  head.appendChild(document.createElement("th"));
  const body = table.createTBody();
  for (const r of recs.slice().reverse()) {
    const row = body.insertRow();
    const mins = (((r.ended || Date.now() / 1000) - r.started) / 60).toFixed(1);
    const cells = [when(r.started), r.vm, `${r.user} (${r.role})`, r.kind, r.window || "-", mins,
      `${Math.ceil(r.size / 1024)} KiB`, r.state + (r.hold ? " (hold)" : "")];
    for (const c of cells) row.insertCell().textContent = c;
    const a = document.createElement("a");
    a.href = `/ui/replay.html?id=${encodeURIComponent(r.id)}`;
    a.textContent = t("replay.open");
    a.dataset.key = `replay:${r.id}`;
    row.insertCell().appendChild(a);
  }
  box.appendChild(table);
}

// -- the player -----------------------------------------------------------------------------------------

function parse(buf) {
  const v = new DataView(buf);
  const out = [];
  for (let p = 0; p + 13 <= buf.byteLength; ) {
    const dir = v.getUint8(p);
    const us = v.getUint32(p + 1) * 4294967296 + v.getUint32(p + 5);
    const n = v.getUint32(p + 9);
    if (dir === 0) out.push({ t: us / 1000, data: buf.slice(p + 13, p + 13 + n) });
    p += 13 + n;
  }
  return out;
}

// A websocket as noVNC's Websock takes one (the properties it checks), open from the start, that sends nowhere.
class Playback {
  constructor() {
    this.binaryType = "arraybuffer";
    this.protocol = "";
    this.readyState = "open";
    this.onerror = null;
    this.onmessage = null;
    this.onopen = null;
    this.onclose = null;
  }
  send() {}
  close() {
    this.readyState = "closed";
    setTimeout(() => this.onclose && this.onclose({ code: 1000, reason: "", wasClean: true }), 0);
  }
  feed(data) {
    if (this.readyState === "open" && this.onmessage) this.onmessage({ data });
  }
}

function rfbSink() {
  let rfb = null;
  let channel = null;
  return {
    reset() {
      if (rfb) rfb.disconnect();
      $("screen").replaceChildren();
      const holder = document.createElement("div");
      holder.style.flex = "1";
      holder.style.display = "flex";
      $("screen").appendChild(holder);
      channel = new Playback();
      rfb = new RFB(holder, channel, { shared: true });
      rfb.viewOnly = true;
      rfb.scaleViewport = true;
    },
    feed(data) {
      channel.feed(data);
    },
  };
}

function textSink() {
  const dec = new TextDecoder();
  const pre = $("text");
  $("screen").hidden = true;
  pre.hidden = false;
  return {
    reset() {
      pre.textContent = "";
    },
    feed(data) {
      // eslint-disable-next-line no-control-regex
      pre.textContent += dec.decode(data, { stream: true }).replace(/\x1b\[[0-9;?]*[A-Za-z]/g, "");
      pre.scrollTop = pre.scrollHeight;
    },
  };
}

async function showPlayer() {
  status("loading", "replay.loading");
  const meta = await get(`/v1/recordings/${encodeURIComponent(id)}`);
  const r = await fetch(`/v1/recordings/${encodeURIComponent(id)}/stream`, { credentials: "same-origin" });
  if (!r.ok) {
    const body = await r.json().catch(() => null);
    throw new ApiError(r.status, body);
  }
  const events = parse(await r.arrayBuffer());
  $("what").textContent = meta.vm;
  document.title = `${meta.vm} – kasou`;
  $("export").href = `/v1/recordings/${encodeURIComponent(id)}/export`;
  $("export").hidden = false;
  $("list").hidden = false;
  $("player").hidden = false;
  const duration = Math.max(events.length ? events[events.length - 1].t : 0,
    ((meta.ended || meta.started) - meta.started) * 1000);
  state.duration = duration;
  const seek = $("seek");
  seek.max = String(Math.ceil(duration));
  const sink = meta.kind === "serial" ? textSink() : rfbSink();
  let next = 0;
  let playing = false;
  let last = 0;

  const feedTo = (pos) => {
    while (next < events.length && events[next].t <= pos) {
      sink.feed(events[next].data);
      next += 1;
    }
    state.fed = next;
  };
  const show = () => {
    seek.value = String(Math.floor(state.position));
    $("time").textContent = `${mmss(state.position)} / ${mmss(duration)}`;
  };
  const goTo = (pos) => {
    pos = Math.max(0, Math.min(duration, pos));
    if (pos < state.position || next === 0) {
      sink.reset();
      next = 0;
    }
    state.position = pos;
    feedTo(pos);
    show();
  };
  const setPlaying = (on) => {
    playing = on;
    $("play").textContent = t(on ? "replay.pause" : "replay.play");
    document.body.dataset.state = on ? "playing" : state.position >= duration ? "ended" : "paused";
    last = performance.now();
    if (on) requestAnimationFrame(tick);
  };
  const tick = (now) => {
    if (!playing) return;
    const speed = Number($("speed").value) || 1;
    state.position = Math.min(duration, state.position + (now - last) * speed);
    last = now;
    feedTo(state.position);
    show();
    if (state.position >= duration) return setPlaying(false);
    requestAnimationFrame(tick);
  };

  $("play").onclick = () => {
    if (!playing && state.position >= duration) goTo(0);
    setPlaying(!playing);
  };
  seek.oninput = () => goTo(Number(seek.value));
  status("ready", "replay.ready", {
    vm: meta.vm, user: meta.user, role: meta.role, started: when(meta.started),
    minutes: (duration / 60000).toFixed(1),
  });
  goTo(0);
  setPlaying(new URLSearchParams(location.search).get("autoplay") !== "0");
}

async function main() {
  translate();
  $("lang").onclick = switchLang;
  try {
    if (id) await showPlayer();
    else await showList();
  } catch (e) {
    refused(e);
  }
}

main();
