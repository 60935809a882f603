// The desktop portal: a clinician's entitled pools, one big "open my desktop" button each; the desktop's
// console page once its guest is up; sign-out gives the desktop back (it is reset to its clean state).
import { get, logout, me, post } from "/ui/api.js";
import { extend, switchLang, t, translate } from "/ui/i18n.js";

extend({
  ja: {
    "portal.title": "デスクトップ",
    "portal.lead": "使うデスクトップのボタンを押してください。",
    "portal.open": "デスクトップを開く",
    "portal.screen": "画面を表示する",
    "portal.preparing": "デスクトップを準備しています…",
    "portal.starting": "デスクトップを起動しています… (しばらくお待ちください)",
    "portal.ready": "デスクトップ {vm} の準備ができました",
    "portal.free": "空き {free} / {size} 台",
    "portal.none": "使えるデスクトップがありません。情報システム部門にお問い合わせください。",
    "portal.slow": "起動に時間がかかっています。もう一度お試しください。",
    "portal.signout": "サインアウト",
    "portal.note": "サインアウトすると、デスクトップは元の状態に戻ります。保存していないものは残りません。",
  },
  en: {
    "portal.title": "Desktops",
    "portal.lead": "Press the button of the desktop you want to use.",
    "portal.open": "Open my desktop",
    "portal.screen": "Show the screen",
    "portal.preparing": "Preparing your desktop…",
    "portal.starting": "Starting your desktop… (please wait)",
    "portal.ready": "Your desktop {vm} is ready",
    "portal.free": "{free} of {size} free",
    "portal.none": "No desktop is available to you. Please ask the IT department.",
    "portal.slow": "Starting takes longer than usual. Please try again.",
    "portal.signout": "Sign out",
    "portal.note": "When you sign out, the desktop goes back to its clean state. Nothing unsaved is kept.",
  },
});

const READY_TIMEOUT_MS = 180000;

function el(tag, attrs, text) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  if (text !== undefined) e.textContent = text;
  return e;
}

async function waitReady(vm, status) {
  const t0 = Date.now();
  while (Date.now() - t0 < READY_TIMEOUT_MS) {
    const mine = await get("/v1/portal/desktop");
    const d = mine.find((x) => x.vm === vm);
    if (!d) throw new Error(t("portal.none"));
    if (d.guest_ready) return d;
    status.textContent = t("portal.starting");
    await new Promise((res) => setTimeout(res, 500));
  }
  throw new Error(t("portal.slow"));
}

function showReady(card, d) {
  const status = card.querySelector(".status");
  status.textContent = t("portal.ready", { vm: d.vm });
  status.classList.add("ready");
  status.dataset.vm = d.vm;
  let link = card.querySelector("a.screen");
  if (!link) {
    link = el("a", { class: "screen", "data-testid": "screen" });
    card.appendChild(link);
  }
  link.href = d.console;
  link.textContent = t("portal.screen");
}

async function open(pool, card, button) {
  const status = card.querySelector(".status");
  const error = document.getElementById("error");
  error.textContent = "";
  status.classList.remove("ready");
  status.textContent = t("portal.preparing");
  button.disabled = true;
  try {
    const d = await post("/v1/portal/desktop", { pool });
    showReady(card, d.guest_ready ? d : await waitReady(d.vm, status));
  } catch (e) {
    status.textContent = "";
    error.textContent = e.message;
  } finally {
    button.disabled = false;
  }
}

function poolCard(p) {
  const card = el("section", { class: "pool-card", "data-pool": p.name });
  card.appendChild(el("h2", {}, p.name));
  card.appendChild(el("p", { class: "desc" }, p.description || t("portal.free", { free: p.free, size: p.size })));
  const button = el("button", { class: "open", type: "button" }, t("portal.open"));
  button.onclick = () => open(p.name, card, button);
  card.appendChild(button);
  card.appendChild(el("p", { class: "status", role: "status" }));
  return card;
}

async function main() {
  translate();
  document.getElementById("lang").onclick = switchLang;
  const who = await me();
  if (!who) {
    location.href = "/ui/"; // the sign-in form; a clinician comes back here after it
    return;
  }
  document.getElementById("who").textContent = who.name;
  document.getElementById("signout").onclick = async () => {
    try {
      await logout();
    } finally {
      location.href = "/ui/";
    }
  };
  const pools = await get("/v1/portal/pools");
  const box = document.getElementById("pools");
  if (!pools.length) {
    box.appendChild(el("p", { class: "lead" }, t("portal.none")));
    return;
  }
  const mine = await get("/v1/portal/desktop");
  for (const p of pools) {
    const card = poolCard(p);
    box.appendChild(card);
    const d = mine.find((x) => x.pool === p.name);
    if (d && d.guest_ready) showReady(card, d);
  }
}

main().catch((e) => {
  document.getElementById("error").textContent = e.message;
});
