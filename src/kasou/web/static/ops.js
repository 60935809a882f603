// The cluster's load balancer and the notification channels on the dashboard.
// Balancer (GET/PUT /v1/cluster/balance/settings, POST /v1/cluster/balance): its mode and threshold (changed by
// those allowed to manage hosts), "Recommend" asks for a dry run and shows each move with its reason and the hosts'
// pressure before and after, "Balance now" runs those moves as one job of live migrations (after a confirmation).
// Notifications (GET /v1/notify/status, POST /v1/notify/test): each channel, what it receives, how its deliveries
// went; an administrator sends a test event and sees, per channel, delivered, failed (why) or skipped (why).
import { get, post, put } from "/ui/api.js";
import { esc, table, when } from "/ui/html.js";
import { t } from "/ui/i18n.js";
import "/ui/ops-labels.js";

const pct = (v) => (v === undefined || v === null ? "—" : `${Number(v).toFixed(0)}%`);
const MODES = ["off", "recommend", "automatic"];

export function opsCards() {
  return `<div class="two">
<section class="card" id="balance-card" hidden aria-labelledby="balance-h"><h2 id="balance-h">${esc(t("bal.title"))}</h2>
  <form id="bal-form" class="toolbar">
    <label>${esc(t("bal.mode"))} <select id="bal-mode">${MODES.map((m) => `<option value="${m}">${esc(t(`bal.mode.${m}`))}</option>`).join("")}</select></label>
    <label>${esc(t("bal.threshold"))} <input id="bal-threshold" type="number" min="1" max="100" step="1" size="4"></label>
    <button type="submit" class="action" id="bal-save">${esc(t("bal.save"))}</button></form>
  <div class="toolbar"><button type="button" class="action" id="bal-recommend">${esc(t("bal.recommend"))}</button>
    <button type="button" class="action primary" id="bal-run" hidden>${esc(t("bal.run"))}</button></div>
  <p class="error" id="bal-error" role="alert"></p><div id="bal-plan" aria-live="polite"></div></section>
<section class="card" id="notify-card" hidden aria-labelledby="notify-h"><h2 id="notify-h">${esc(t("ntf.title"))}</h2>
  <div id="notify-box"></div>
  <div class="toolbar"><button type="button" class="action" id="ntf-test" hidden>${esc(t("ntf.test"))}</button></div>
  <p class="error" id="ntf-error" role="alert"></p><div id="ntf-results" aria-live="polite"></div></section>
</div>`;
}

// Wire the cards once. helpers: confirm(message) -> Promise (null when cancelled), track(job, title), refresh().
export function setupOps(root, who, helpers) {
  const may = (p) => who.permissions.includes(p);
  if (!may("read")) return; // a department's vendor: neither is theirs
  const bal = root.querySelector("#balance-card");
  const ntf = root.querySelector("#notify-card");
  bal.hidden = false;
  ntf.hidden = false;
  const manage = may("hosts");
  for (const id of ["#bal-mode", "#bal-threshold", "#bal-save"]) root.querySelector(id).disabled = !manage;
  root.querySelector("#bal-recommend").hidden = !manage; // a dry run measures every host: the same permission
  root.querySelector("#ntf-test").hidden = !may("users");
  const balError = root.querySelector("#bal-error");
  root.querySelector("#bal-form").onsubmit = async (ev) => {
    ev.preventDefault();
    try {
      const s = await put("/v1/cluster/balance/settings", {
        ...bal.settings,
        mode: root.querySelector("#bal-mode").value,
        threshold: Number(root.querySelector("#bal-threshold").value),
      });
      showSettings(root, s);
      balError.textContent = "";
      bal.dataset.saved = s.mode;
    } catch (e) {
      balError.textContent = `${t("bal.save")} — ${e.message}`;
    }
  };
  root.querySelector("#bal-recommend").onclick = async () => {
    try {
      const res = await post("/v1/cluster/balance", { dry_run: true });
      balError.textContent = "";
      showPlan(root, res.plan);
    } catch (e) {
      balError.textContent = `${t("bal.recommend")} — ${e.message}`;
    }
  };
  root.querySelector("#bal-run").onclick = async () => {
    const n = Number(bal.dataset.moves || 0);
    if (!(await helpers.confirm(t("bal.confirm", { n })))) return;
    try {
      const res = await post("/v1/cluster/balance", { dry_run: false });
      balError.textContent = "";
      showPlan(root, res.plan);
      root.querySelector("#bal-run").hidden = true;
      if (res.job) helpers.track(res.job, t("bal.run"));
      helpers.refresh();
    } catch (e) {
      balError.textContent = `${t("bal.run")} — ${e.message}`;
    }
  };
  root.querySelector("#ntf-test").onclick = async () => {
    const out = root.querySelector("#ntf-results");
    const btn = root.querySelector("#ntf-test");
    btn.disabled = true;
    try {
      const res = await post("/v1/notify/test", {});
      root.querySelector("#ntf-error").textContent = "";
      const rows = res.results.map(
        (r) => `<tr data-channel="${esc(r.channel)}" data-outcome="${esc(r.outcome)}"><th scope="row">${esc(r.channel)}</th>
          <td>${esc(r.target)}</td><td><span class="state ${r.outcome === "delivered" ? "ok" : r.outcome === "failed" ? "failed" : "stopped"}">
          ${esc(t(`ntf.outcome.${r.outcome}`))}</span></td><td class="small">${esc(r.reason)}</td></tr>`,
      );
      out.innerHTML = table("ntf-test-results", ["ntf.channel", "ntf.target", "ntf.outcome", "ntf.reason"], rows, t("ntf.test"));
      refreshOps(root);
    } catch (e) {
      root.querySelector("#ntf-error").textContent = `${t("ntf.test")} — ${e.message}`;
    } finally {
      btn.disabled = false;
    }
  };
  refreshOps(root);
}

function showSettings(root, s) {
  const bal = root.querySelector("#balance-card");
  bal.settings = s;
  bal.dataset.mode = s.mode;
  const mode = root.querySelector("#bal-mode");
  const thr = root.querySelector("#bal-threshold");
  if (document.activeElement !== mode) mode.value = s.mode;
  if (document.activeElement !== thr) thr.value = String(s.threshold);
}

function showPlan(root, plan) {
  const hosts = Object.keys(plan.pressure_before || {}).sort();
  const after = plan.pressure_after || {};
  const hostRows = hosts.map((h) => {
    const b = plan.pressure_before[h] || {};
    const a = after[h] || b;
    return `<tr data-host="${esc(h)}"><th scope="row">${esc(h)}</th><td>${pct(b.cpu)} → ${pct(a.cpu)}</td>
      <td>${pct(b.memory)} → ${pct(a.memory)}</td></tr>`;
  });
  const moves = (plan.moves || []).map(
    (m) => `<tr data-move="${esc(m.vm)}"><th scope="row">${esc(m.vm)}</th><td>${esc(m.source)} → ${esc(m.target)}</td>
      <td>${esc(t(`bal.res.${m.resource}`))}</td><td class="small">${esc(m.reason)}</td></tr>`,
  );
  const excluded = Object.entries(plan.excluded || {}).map(([h, why]) => `<li>${esc(h)}: ${esc(why)}</li>`).join("");
  const held = Object.keys(plan.held || {}).length;
  root.querySelector("#bal-plan").innerHTML = `<p class="bal-summary">${esc(plan.summary)}</p>
    ${table("bal-hosts", ["col.host", "col.cpu", "col.memory"], hostRows, t("bal.pressure"))}
    ${table("bal-moves", ["bal.vm", "bal.fromto", "bal.resource", "bal.reason"], moves, t("bal.moves"))}
    ${held ? `<p class="muted small">${esc(t("bal.held", { n: held }))}</p>` : ""}
    ${excluded ? `<ul class="small muted">${excluded}</ul>` : ""}`;
  const bal = root.querySelector("#balance-card");
  bal.dataset.moves = String((plan.moves || []).length);
  root.querySelector("#bal-run").hidden = !(plan.moves || []).length;
}

function channelRow(c) {
  const last = c.last_time
    ? `${esc(when(c.last_time, "medium"))} <span class="state ${c.last_ok ? "ok" : "failed"}">${esc(t(c.last_ok ? "ntf.ok" : "ntf.failed"))}</span>`
    : esc(t("ntf.never"));
  const error = c.last_error ? `<br><span class="small error">${esc(c.last_error)}</span>` : "";
  return `<tr data-channel="${esc(c.name)}"><th scope="row">${esc(c.name)}</th><td>${esc(t(`ntf.kind.${c.kind}`))}</td>
    <td class="small">${esc(c.target)}</td><td>${esc(c.department || t("ntf.all_departments"))}</td>
    <td>${esc(t(`ntf.severity.${c.min_severity}`))}</td><td>${c.delivered} / ${c.failures}${c.dropped ? ` / ${c.dropped}` : ""}</td>
    <td>${last}${error}</td></tr>`;
}

// Read both again (the dashboard's refresh calls this too).
export async function refreshOps(root) {
  const bal = root.querySelector("#balance-card");
  if (!bal || bal.hidden) return;
  try {
    const [settings, status] = await Promise.all([get("/v1/cluster/balance/settings"), get("/v1/notify/status")]);
    showSettings(root, settings);
    const rows = status.channels.map(channelRow);
    const heads = ["ntf.channel", "ntf.kind", "ntf.target", "ntf.department", "ntf.min_severity", "ntf.counts", "ntf.last"];
    root.querySelector("#notify-box").innerHTML = status.channels.length
      ? table("notify-channels", heads, rows, t("ntf.title"))
      : `<p class="muted" id="notify-none">${esc(t("ntf.none"))}</p>`;
  } catch (e) {
    root.querySelector("#ntf-error").textContent = e.message;
  }
}
