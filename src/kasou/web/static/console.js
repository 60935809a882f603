// A VM's console: a one-time ticket from the API, then noVNC (Debian's novnc package) on the API's websocket
// proxy. The page shows why when there is no console (no right, VM not running, ticket refused).
// For tests and the benchmark: body[data-state] is starting|connecting|connected|drawn|refused|closed, and
// window.kasouConsole holds performance.now() marks (ticketAt, connectedAt, firstFrameAt).
import RFB from "/ui/novnc/core/rfb.js";
import { ApiError, post } from "/ui/api.js";
import { extend, switchLang, t, translate } from "/ui/i18n.js";

extend({
  ja: {
    "console.title": "コンソール",
    "console.cad": "Ctrl+Alt+Del 送信",
    "console.reconnect": "再接続",
    "console.back": "戻る",
    "console.connecting": "接続しています…",
    "console.connected": "接続しました。画面をクリックするとキー入力が仮想マシンに送られます。",
    "console.closed": "コンソールは閉じられました。",
    "console.lost": "コンソールとの接続が切れました（仮想マシンが停止したか、接続が拒否されました）。",
    "console.forbidden": "この仮想マシンのコンソールを開く権限がありません。",
    "console.notrunning": "この仮想マシンは動いていません（{message}）。起動してから開いてください。",
    "console.unknown": "この仮想マシンはありません。",
    "console.signin": "サインインしてください。",
    "console.novm": "仮想マシンが指定されていません。",
    "console.failed": "コンソールを開けませんでした: {message}",
    "console.policy": "クリップボード: {clip} ・ ファイル転送: {file} ・ USB: {usb}",
    "console.on": "可",
    "console.off": "不可",
  },
  en: {
    "console.title": "Console",
    "console.cad": "Send Ctrl+Alt+Del",
    "console.reconnect": "Reconnect",
    "console.back": "Back",
    "console.connecting": "Connecting…",
    "console.connected": "Connected. Click the screen to send keys to the VM.",
    "console.closed": "The console was closed.",
    "console.lost": "The console connection ended (the VM stopped, or the connection was refused).",
    "console.forbidden": "You may not open this VM's console.",
    "console.notrunning": "This VM is not running ({message}). Start it, then open its console.",
    "console.unknown": "There is no such VM.",
    "console.signin": "Please sign in.",
    "console.novm": "No VM was named.",
    "console.failed": "Could not open the console: {message}",
    "console.policy": "Clipboard: {clip} · File transfer: {file} · USB: {usb}",
    "console.on": "allowed",
    "console.off": "off",
  },
});

const marks = (window.kasouConsole = { ticketAt: null, connectedAt: null, firstFrameAt: null });
const $ = (id) => document.getElementById(id);
const vm = new URLSearchParams(location.search).get("vm");
let rfb = null;

function setState(state, key, vars, bad = false) {
  document.body.dataset.state = state;
  const el = $("status");
  el.textContent = key ? t(key, vars) : "";
  el.classList.toggle("bad", bad);
}

function refusal(e) {
  if (!(e instanceof ApiError)) return ["console.failed", { message: e.message }];
  if (e.status === 401) return ["console.signin", {}];
  if (e.status === 403) return ["console.forbidden", {}];
  if (e.status === 404) return ["console.unknown", {}];
  if (e.status === 409) return ["console.notrunning", { message: e.message }];
  return ["console.failed", { message: e.message }];
}

// The first frame: the canvas holds a pixel that is not black (a text console draws its characters).
function watchFirstFrame(deadline) {
  const canvas = $("screen").querySelector("canvas");
  const look = () => {
    if (!rfb || marks.firstFrameAt !== null) return;
    if (canvas && canvas.width > 0 && canvas.height > 0) {
      const ctx = canvas.getContext("2d", { willReadFrequently: true });
      const px = ctx.getImageData(0, 0, canvas.width, canvas.height).data;
      for (let i = 0; i < px.length; i += 4 * 7) {
        if (px[i] || px[i + 1] || px[i + 2]) {
          marks.firstFrameAt = performance.now();
          document.body.dataset.state = "drawn";
          return;
        }
      }
    }
    if (performance.now() < deadline) requestAnimationFrame(look);
  };
  requestAnimationFrame(look);
}

async function connect() {
  $("reconnect").hidden = true;
  if (!vm) return setState("refused", "console.novm", {}, true);
  setState("connecting", "console.connecting");
  let ticket;
  try {
    ticket = await post(`/v1/vms/${encodeURIComponent(vm)}/console-ticket`);
  } catch (e) {
    const [key, vars] = refusal(e);
    setState("refused", key, vars, true);
    if (e.status === 409) $("reconnect").hidden = false;
    return;
  }
  marks.ticketAt = performance.now();
  const p = ticket.policy;
  const yn = (b) => t(b ? "console.on" : "console.off");
  $("policy").textContent = t("console.policy", { clip: yn(p.clipboard), file: yn(p.file_transfer), usb: yn(p.usb) });
  const scheme = location.protocol === "https:" ? "wss" : "ws";
  rfb = new RFB($("screen"), `${scheme}://${location.host}${ticket.url}`, { shared: true });
  rfb.scaleViewport = true;
  rfb.focusOnClick = true;
  rfb.addEventListener("connect", () => {
    marks.connectedAt = performance.now();
    setState("connected", "console.connected");
    $("cad").disabled = false;
    rfb.focus();
    watchFirstFrame(performance.now() + 60000);
  });
  rfb.addEventListener("disconnect", (ev) => {
    const wasUp = marks.connectedAt !== null;
    rfb = null;
    $("cad").disabled = true;
    $("reconnect").hidden = false;
    if (ev.detail.clean && wasUp) setState("closed", "console.closed");
    else setState(wasUp ? "closed" : "refused", "console.lost", {}, true);
  });
  // The clipboard is never wired: the proxy drops clipboard data unless the pool allows it, and this
  // page gives the endpoint's clipboard nothing of the VM's.
}

function main() {
  translate();
  $("vm-name").textContent = vm || "";
  document.title = `${vm || ""} – kasou`;
  $("lang").onclick = switchLang;
  $("cad").onclick = () => rfb && rfb.sendCtrlAltDel();
  $("reconnect").onclick = () => {
    marks.connectedAt = marks.firstFrameAt = null;
    connect();
  };
  connect();
}

main();
