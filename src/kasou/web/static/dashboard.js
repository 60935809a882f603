// The dashboard (to be filled in): hosts, VMs, pools, desktops, jobs, events.
import { get } from "/ui/api.js";

export async function showDashboard(el, who) {
  const vms = await get("/v1/vms");
  el.innerHTML = `<section class="card"><h2>VMs</h2><table id="vms"><tbody></tbody></table></section>`;
  const tb = el.querySelector("#vms tbody");
  for (const v of vms) {
    const tr = document.createElement("tr");
    tr.dataset.vm = v.name;
    for (const text of [v.name, v.state, v.host || "-"]) {
      const td = document.createElement("td");
      td.textContent = text;
      tr.appendChild(td);
    }
    tb.appendChild(tr);
  }
}
