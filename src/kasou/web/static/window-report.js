// One maintenance window's report (GET /v1/maintenance-windows/{id}/report): its stated plan and the actions
// recorded under it in the audit log, for the department's sign-off.
import { get } from "/ui/api.js";
import { esc, when } from "/ui/html.js";
import { t, translate } from "/ui/i18n.js";
import "/ui/dashboard-labels.js";
import "/ui/windows-labels.js";


async function main() {
  translate();
  document.getElementById("back").textContent = t("mw.back");
  const box = document.getElementById("report");
  const id = new URLSearchParams(location.search).get("id") || "";
  try {
    const r = await get(`/v1/maintenance-windows/${encodeURIComponent(id)}/report`);
    const w = r.window;
    const state = w.active ? "active" : w.state;
    const rows = r.actions.map((a) => {
      const ok = !a.result || a.result.ok;
      return `<tr><td class="nowrap">${esc(a.time)}</td><td>${esc(a.action)}</td><td>${esc(a.target)}</td>
        <td>${ok ? "ok" : `<span class="error">${esc((a.result && a.result.status) || "")} ${esc(a.result && a.result.message)}</span>`}</td></tr>`;
    });
    box.innerHTML = `<h2>${esc(t("mw.report_title"))}: <span id="mw-id">${esc(w.id)}</span></h2>
      <p><span class="state" id="mw-state" data-state="${esc(state)}">${esc(t(`mw.state.${state}`))}</span>
        ${esc(t("mw.vendor"))}: ${esc(w.vendor)} · ${esc(t("mw.vms"))}: ${esc(w.vms.join(", "))} ·
        ${esc(when(w.starts_at))} — ${esc(when(w.ends_at))}</p>
      <h3>${esc(t("mw.stated_plan"))}</h3><pre class="mw-plan">${esc(r.plan)}</pre>
      <h3>${esc(t("mw.done"))}</h3><p id="mw-summary">${esc(t("mw.summary", { n: r.actions.length, refused: r.refused }))}</p>
      <table id="mw-actions"><thead><tr><th>${esc(t("col.time"))}</th><th>${esc(t("col.action"))}</th>
        <th>${esc(t("col.subject"))}</th><th>${esc(t("col.result"))}</th></tr></thead>
      <tbody>${rows.join("") || `<tr><td colspan="4" class="muted">${esc(t("dash.none"))}</td></tr>`}</tbody></table>
      <p>${esc(t("mw.signoff"))}</p>`;
  } catch (e) {
    box.innerHTML = `<p class="error" role="alert">${esc(e.message)}</p>`;
  }
}

main();
