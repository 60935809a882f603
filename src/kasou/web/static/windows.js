// Vendors' maintenance windows on the dashboard (GET/POST /v1/maintenance-windows): the list with each window's
// state, vendor, VMs, span and plan; approve, deny and revoke for those allowed (the server decides: an administrator
// or the department's manager, never the requester); a form to request one; a link to each window's report.
import { post } from "/ui/api.js";
import { esc, when } from "/ui/html.js";
import { t } from "/ui/i18n.js";
import "/ui/windows-labels.js";


// The card's frame: the table's box and the request form (kept across refreshes, so typing is not lost).
export function windowsCard() {
  return `<section class="card" id="windows-card" hidden aria-labelledby="windows-h">
  <h2 id="windows-h">${esc(t("mw.title"))}</h2><div id="windows-box"></div>
  <p class="error" id="mw-error" role="alert"></p>
  <details id="mw-request"><summary>${esc(t("mw.request"))}</summary>
  <form id="mw-form" class="mw-form">
    <label for="mw-vendor">${esc(t("mw.vendor"))}</label><input id="mw-vendor" name="vendor" required>
    <label for="mw-vms">${esc(t("mw.vms"))}</label>
    <input id="mw-vms" name="vms" required placeholder="${esc(t("mw.vms_hint"))}">
    <label for="mw-from">${esc(t("mw.from"))}</label><input id="mw-from" name="from" type="datetime-local" required>
    <label for="mw-to">${esc(t("mw.to"))}</label><input id="mw-to" name="to" type="datetime-local" required>
    <label for="mw-plan">${esc(t("mw.plan"))}</label><textarea id="mw-plan" name="plan" rows="3" required></textarea>
    <label for="mw-perms">${esc(t("mw.permissions"))}</label>
    <select id="mw-perms" name="permissions"><option value="">${esc(t("mw.perm_all"))}</option>
      <option value="vm.read">vm.read</option><option value="vm.read,operate">vm.read, operate</option>
      <option value="vm.read,console">vm.read, console</option></select>
    <button type="submit" class="action primary" id="mw-submit">${esc(t("mw.submit"))}</button>
  </form></details></section>`;
}

const local = (d) => {
  const p = (n) => String(n).padStart(2, "0");
  return `${d.getFullYear()}-${p(d.getMonth() + 1)}-${p(d.getDate())}T${p(d.getHours())}:${p(d.getMinutes())}`;
};

// Wire the form and the buttons once; refresh() re-reads the dashboard after a change.
export function setupWindows(root, who, refresh) {
  const card = root.querySelector("#windows-card");
  const mayRequest = who.permissions.includes("operate") || who.permissions.includes("approve");
  root.querySelector("#mw-request").hidden = !mayRequest;
  const form = root.querySelector("#mw-form");
  if (who.role === "vendor") {
    form.vendor.value = who.name;
    form.vendor.readOnly = true;
  }
  const now = new Date();
  form.from.value = local(now);
  form.to.value = local(new Date(now.getTime() + 2 * 3600 * 1000));
  const error = root.querySelector("#mw-error");
  form.onsubmit = async (ev) => {
    ev.preventDefault();
    const body = {
      vendor: form.vendor.value.trim(),
      vms: form.vms.value.split(",").map((s) => s.trim()).filter(Boolean),
      starts_at: new Date(form.from.value).getTime() / 1000,
      ends_at: new Date(form.to.value).getTime() / 1000,
      plan: form.plan.value,
    };
    if (form.permissions.value) body.permissions = form.permissions.value.split(",");
    try {
      const w = await post("/v1/maintenance-windows", body);
      error.textContent = "";
      form.plan.value = "";
      form.vms.value = "";
      root.querySelector("#mw-request").open = false;
      card.dataset.last = w.id;
      refresh();
    } catch (e) {
      error.textContent = `${t("mw.request")} — ${e.message}`;
    }
  };
  card.addEventListener("click", async (ev) => {
    const btn = ev.target.closest("button[data-mw]");
    if (!btn) return;
    btn.disabled = true;
    try {
      await post(`/v1/maintenance-windows/${encodeURIComponent(btn.dataset.id)}/${btn.dataset.mw}`);
      error.textContent = "";
    } catch (e) {
      error.textContent = `${t(`mw.${btn.dataset.mw}`)} ${btn.dataset.id} — ${e.message}`;
    }
    refresh();
  });
}

function buttons(w, who) {
  const out = [];
  const b = (verb, cls = "") =>
    `<button type="button" class="action ${cls}" data-mw="${verb}" data-id="${esc(w.id)}" data-key="mw-${verb}:${esc(w.id)}"
      aria-label="${esc(t("act.label", { action: t(`mw.${verb}`), target: w.id }))}">${esc(t(`mw.${verb}`))}</button>`;
  const decider = who.permissions.includes("approve") && w.requested_by !== who.name && w.vendor !== who.name;
  if (w.state === "requested" && decider) out.push(b("approve", "primary"), b("deny", "danger"));
  const revoker = who.permissions.includes("approve") || who.permissions.includes("operate");
  if (["requested", "approved"].includes(w.state) && revoker) out.push(b("revoke", "danger"));
  out.push(`<a class="action" href="/ui/window-report.html?id=${encodeURIComponent(w.id)}"
    data-key="mw-report:${esc(w.id)}">${esc(t("mw.report"))}</a>`);
  return out.join(" ");
}

const STATE_CLASS = { requested: "pending", approved: "ok", active: "running", denied: "failed", revoked: "stopped",
  expired: "stopped" };

// The windows' table (newest start last, as the API lists them).
export function renderWindows(root, windows, who) {
  const card = root.querySelector("#windows-card");
  card.hidden = windows === null;
  if (windows === null) return;
  const rows = windows.map((w) => {
    const state = w.active ? "active" : w.state;
    return `<tr data-window="${esc(w.id)}" data-state="${esc(state)}"><th scope="row">${esc(w.id)}</th>
      <td class="mw-state"><span class="state ${esc(STATE_CLASS[state] || "")}">${esc(t(`mw.state.${state}`))}</span></td>
      <td>${esc(w.vendor)}</td><td>${esc(w.vms.join(", "))}</td>
      <td class="nowrap">${esc(when(w.starts_at))}<br>${esc(when(w.ends_at))}</td>
      <td class="small mw-plan">${esc(w.plan)}</td>
      <td class="small">${esc(w.requested_by)}${w.decided_by ? ` / ${esc(w.decided_by)}` : ""}</td>
      <td class="acts">${buttons(w, who)}</td></tr>`;
  });
  const heads = ["mw.id", "col.state", "mw.vendor", "mw.vms", "mw.span", "mw.plan", "mw.by", "col.actions"];
  const th = heads.map((h) => `<th scope="col">${esc(t(h))}</th>`).join("");
  const body = rows.length ? rows.join("") : `<tr><td colspan="${heads.length}" class="muted">${esc(t("dash.none"))}</td></tr>`;
  root.querySelector("#windows-box").innerHTML =
    `<table id="windows" aria-label="${esc(t("mw.title"))}"><thead><tr>${th}</tr></thead><tbody>${body}</tbody></table>`;
}
