// The operators' dashboard: hosts, VMs, storage and desktop pools, jobs and events; actions with live job progress;
// small charts of the last minutes (GET /v1/metrics/history); each VM's backups and its latest restore drill
// (GET /v1/backups/status); vendors' maintenance windows (windows.js). The VM list follows GET /v1/vms?watch=true
// (server-sent events: each change as it happens); the rest refreshes every few seconds. If the stream fails, the
// VM list is read with the rest again (every REFRESH_MS) until the stream can be opened again.
import { get, post } from "/ui/api.js";
import { esc, table, when } from "/ui/html.js";
import { lang, t } from "/ui/i18n.js";
import "/ui/dashboard-labels.js";
import { sparkline } from "/ui/charts.js";
import { trackJob } from "/ui/jobs-live.js";
import { opsCards, refreshOps, setupOps } from "/ui/ops.js";
import { renderWindows, setupWindows, windowsCard } from "/ui/windows.js";

const REFRESH_MS = 5000;
const LIVE_REFRESH_MS = 15000; // while the VM list streams: hosts, charts, jobs, ...
const STREAM_RETRY_MS = 30000; // after a failed stream: polling until then
const HEARTBEAT_FRESH_S = 5;
let root = null;
let who = null;
let timer = null;
let busy = false;
let again = false; // a refresh was asked for while one ran
let vmStream = null; // the EventSource of GET /v1/vms?watch=true, once its list has come
const data = { hosts: [], vms: [], uptime: [], pools: [], desktops: null, jobs: [], events: [], hist: null, audit: null, backups: null,
  windows: null };

const can = (perm) => who && who.permissions.includes(perm);

function bytes(n) {
  if (n === null || n === undefined || !Number.isFinite(n)) return "—";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  let v = n;
  while (v >= 1024 && i < units.length - 1) {
    v /= 1024;
    i += 1;
  }
  return `${v >= 10 || i === 0 ? Math.round(v) : v.toFixed(1)} ${units[i]}`;
}

function duration(s) {
  if (s === null || s === undefined) return "—";
  s = Math.floor(s);
  const d = Math.floor(s / 86400);
  const h = Math.floor((s % 86400) / 3600);
  const m = Math.floor((s % 3600) / 60);
  if (d > 0) return t("uptime.days", { d, h });
  if (h > 0) return t("uptime.hours", { h, m });
  return t("uptime.minutes", { m, s: s % 60 });
}

const clock = (epoch) => new Date(epoch * 1000).toLocaleTimeString(lang() === "ja" ? "ja-JP" : "en-GB");
const badge = (state, cls) => `<span class="state ${esc(cls || state)}">${esc(t(`state.${state}`))}</span>`;

function button(act, target, label, extra = "") {
  const aria = esc(t("act.label", { action: label, target }));
  return `<button type="button" class="action ${extra}" data-act="${esc(act)}" data-target="${esc(target)}"
    data-key="${esc(`${act}:${target}`)}" aria-label="${aria}" title="${aria}">${esc(label)}</button>`;
}

// -- the page's frame --------------------------------------------------------------------------------------

const FRAME = `
<div class="toolbar"><span class="who"></span><span class="spacer"></span>
  <span class="updated muted" aria-live="off"></span>
  <button type="button" class="action" id="refresh" data-i18n="dash.refresh"></button></div>
<p class="error" id="dash-error" role="alert"></p>
<section class="card" id="live-card" hidden aria-labelledby="live-h"><h2 id="live-h" data-i18n="dash.live"></h2>
  <div id="live" aria-live="polite"></div></section>
<section class="card" aria-labelledby="hosts-h"><h2 id="hosts-h" data-i18n="dash.hosts"></h2><div id="hosts-box"></div></section>
<section class="card" aria-labelledby="vms-h"><h2 id="vms-h" data-i18n="dash.vms"></h2>
  <div class="toolbar" id="vm-filters" role="search"><label><span data-i18n="filter.state"></span> <select id="vm-filter-state">
    <option value="" data-i18n="filter.any"></option></select></label>
  <label><span data-i18n="filter.tag"></span> <input id="vm-filter-tag" type="search" size="14" autocomplete="off"></label></div>
  <div id="vms-box"></div></section>
<section class="card" id="backups-card" hidden aria-labelledby="backups-h"><h2 id="backups-h" data-i18n="dash.backups"></h2>
  <div id="backups-box"></div></section>
<div class="two">
  <section class="card" aria-labelledby="pools-h"><h2 id="pools-h" data-i18n="dash.pools"></h2><div id="pools-box"></div></section>
  <section class="card" id="desktops-card" hidden aria-labelledby="desk-h"><h2 id="desk-h" data-i18n="dash.desktops"></h2>
    <div id="desktops-box"></div></section>
</div>
<div class="two">
  <section class="card" aria-labelledby="jobs-h"><h2 id="jobs-h" data-i18n="dash.jobs"></h2><div id="jobs-box"></div></section>
  <section class="card" aria-labelledby="events-h"><h2 id="events-h" data-i18n="dash.events"></h2><div id="events-box"></div></section>
</div>
<section class="card" id="audit-card" hidden aria-labelledby="audit-h"><h2 id="audit-h" data-i18n="dash.audit"></h2>
  <div id="audit-box"></div></section>
<dialog id="confirm" aria-labelledby="confirm-msg"><form method="dialog">
  <p id="confirm-msg"></p><p id="confirm-extra"></p>
  <div class="buttons"><button type="submit" value="cancel" class="action" data-i18n="act.cancel"></button>
  <button type="submit" value="ok" class="action primary" id="confirm-ok" data-i18n="act.confirm"></button></div>
</form></dialog>`;

export async function showDashboard(el, me) {
  root = el;
  who = me;
  el.innerHTML = FRAME;
  for (const n of el.querySelectorAll("[data-i18n]")) n.textContent = t(n.dataset.i18n);
  el.querySelector(".who").textContent = t("dash.signedin", { name: me.name, role: t(`role.${me.role}`) });
  const states = el.querySelector("#vm-filter-state");
  for (const s of VM_STATES) states.insertAdjacentHTML("beforeend", `<option value="${s}">${esc(t(`state.${s}`))}</option>`);
  for (const id of ["#vm-filter-state", "#vm-filter-tag"]) {
    el.querySelector(id).addEventListener("input", () => (el.querySelector("#vms-box").innerHTML = vmsTable()));
  }
  el.querySelector("#vms-h").closest("section").insertAdjacentHTML("afterend", windowsCard());
  setupWindows(el, me, () => refresh());
  el.querySelector("#audit-card").insertAdjacentHTML("beforebegin", opsCards());
  setupOps(el, me, { confirm: (m) => confirmDialog(m), track: (job, title) => trackLive(job, title), refresh: () => refresh() });
  el.querySelector("#refresh").onclick = () => refresh();
  el.addEventListener("click", onClick);
  await refresh();
  watchVms();
  listenEvents();
  document.addEventListener("visibilitychange", () => {
    if (!document.hidden) refresh();
  });
}

// The VM list as it changes (GET /v1/vms?watch=true): first the whole list, then added, modified and deleted VMs.
// The stream is bounded (timeout): the next one is opened at once. On a failure the dashboard polls again.
function watchVms() {
  if (!window.EventSource || !can("vm.read")) return;
  const es = new EventSource("/v1/vms?watch=true&timeout=600");
  const apply = (fn) => (ev) => {
    fn(JSON.parse(ev.data));
    render();
  };
  es.addEventListener(
    "list",
    apply((vms) => {
      data.vms = vms;
      vmStream = es;
      root.dataset.vmStream = "live"; // for the browser tests and anyone curious
    }),
  );
  const put = (v) => {
    const i = data.vms.findIndex((x) => x.name === v.name);
    if (i >= 0) data.vms[i] = v;
    else data.vms = [...data.vms, v].sort((a, b) => (a.name < b.name ? -1 : 1));
  };
  es.addEventListener("added", apply(put));
  es.addEventListener("modified", apply(put));
  es.addEventListener("deleted", apply((v) => (data.vms = data.vms.filter((x) => x.name !== v.name))));
  let over = false;
  const ended = (retryMs) => {
    if (over) return;
    over = true;
    es.close();
    if (vmStream === es) vmStream = null;
    root.dataset.vmStream = "polling";
    if (retryMs) {
      refresh(); // poll meanwhile
      setTimeout(watchVms, retryMs);
    } else watchVms();
  };
  es.addEventListener("timeout", () => ended(0));
  // The connection failed (the server restarts, the session ended) or the server sent an "error" event.
  es.onerror = () => ended(STREAM_RETRY_MS);
}

// Operator events (a degraded disk, a pool low on space, ...) refresh the page at once (GET /v1/events?watch=true).
function listenEvents() {
  if (!window.EventSource || !can("read")) return;
  const es = new EventSource("/v1/events?watch=true&limit=12&timeout=600");
  es.addEventListener("event", () => refresh());
  es.addEventListener("timeout", () => {
    es.close();
    listenEvents(); // the stream is bounded: open the next one
  });
  es.onerror = () => {
    es.close();
    setTimeout(listenEvents, 30000); // the server restarts or the session ended: try again later
  };
}

async function refresh() {
  if (busy) {
    again = true;
    return;
  }
  busy = true;
  again = false;
  clearTimeout(timer);
  const soft = (p, fallback) => p.catch((e) => (e.status === 404 ? fallback : Promise.reject(e)));
  try {
    const audit = can("audit") ? soft(get("/v1/audit/records?limit=12"), null).catch(() => null) : Promise.resolve(null);
    // A department's vendor reads their VMs only: hosts, pools, events and metrics are not theirs.
    const all = (path, none) => (can("read") ? get(path) : Promise.resolve(none));
    const windows = can("vm.read") ? get("/v1/maintenance-windows").catch(() => null) : Promise.resolve(null);
    const [hosts, vms, uptime, pools, desktops, jobs, events, hist, records, backups, mw] = await Promise.all([
      all("/v1/hosts", []),
      vmStream ? Promise.resolve(data.vms) : get("/v1/vms"), // streamed: watchVms keeps it
      get("/v1/reports/uptime"),
      can("read") ? soft(get("/v1/pools"), []) : Promise.resolve([]),
      can("read") ? soft(get("/v1/desktop-pools"), null) : Promise.resolve(null),
      get("/v1/jobs?limit=12"),
      all("/v1/events?limit=12", []),
      can("read") ? soft(get("/v1/metrics/history"), null) : Promise.resolve(null),
      audit,
      can("read") ? soft(get("/v1/backups/status"), null) : Promise.resolve(null),
      windows,
    ]);
    Object.assign(data, { hosts, vms, uptime, pools, desktops, jobs, events, hist, audit: records, backups, windows: mw });
    render();
    refreshOps(root);
    root.querySelector("#dash-error").textContent = "";
    root.querySelector(".updated").textContent = t("dash.updated", { time: clock(Date.now() / 1000) });
  } catch (e) {
    if (e.status === 401) {
      location.reload(); // the session ended: back to the sign-in form
      return;
    }
    root.querySelector("#dash-error").textContent = `${t("dash.failed")}: ${e.message}`;
  } finally {
    busy = false;
    timer = setTimeout(refresh, again ? 200 : vmStream ? LIVE_REFRESH_MS : REFRESH_MS);
  }
}

// Re-render every table, keeping the keyboard focus on the same control.
function render() {
  const focused = document.activeElement && document.activeElement.dataset ? document.activeElement.dataset.key : null;
  root.querySelector("#hosts-box").innerHTML = hostsTable();
  root.querySelector("#vms-box").innerHTML = vmsTable();
  renderWindows(root, data.windows, who);
  root.querySelector("#backups-card").hidden = data.backups === null;
  if (data.backups !== null) root.querySelector("#backups-box").innerHTML = backupsTable();
  root.querySelector("#pools-box").innerHTML = poolsTable();
  const dc = root.querySelector("#desktops-card");
  dc.hidden = data.desktops === null;
  if (data.desktops !== null) root.querySelector("#desktops-box").innerHTML = desktopsTable();
  root.querySelector("#jobs-box").innerHTML = jobsTable();
  root.querySelector("#events-box").innerHTML = eventsTable();
  root.querySelector("#audit-card").hidden = data.audit === null;
  if (data.audit !== null) root.querySelector("#audit-box").innerHTML = auditTable();
  if (focused) {
    const again = root.querySelector(`[data-key="${CSS.escape(focused)}"]`);
    if (again) again.focus();
  }
}

// -- hosts ---------------------------------------------------------------------------------------------------

function hostState(h) {
  if (h.state === "down") return badge("down", "crashed");
  if (h.maintenance || h.state === "maintenance") return badge("maintenance", "paused");
  return badge("up", "running");
}

function hostsTable() {
  const hist = (data.hist && data.hist.hosts) || {};
  const rows = data.hosts.map((h) => {
    const pts = hist[h.name] || [];
    const cpu = pts.length ? pts[pts.length - 1].cpu_pct : null;
    const label = cpu === null ? t("chart.collecting") : t("chart.cpu", { pct: cpu.toFixed(0) });
    const used = h.memory_used_mib;
    const cap = h.memory_capacity_mib || h.memory_total_mib || 1;
    const frac = Math.min(100, Math.round((100 * used) / cap));
    const maint = h.maintenance
      ? button("maint-off", h.name, t("act.maint_off"))
      : button("maint-on", h.name, t("act.maint_on"));
    return `<tr data-host="${esc(h.name)}"><th scope="row">${esc(h.name)}</th><td>${hostState(h)}</td>
      <td>${esc(h.cpus)} · ${esc(h.accelerator || "")}</td>
      <td class="chart">${sparkline(pts.map((p) => p.cpu_pct), { max: 100, label })}
        <span class="figure">${cpu === null ? "" : `${cpu.toFixed(0)}%`}</span></td>
      <td>${esc(Number(h.load_1m).toFixed(2))}</td>
      <td><span class="meter" role="meter" aria-valuemin="0" aria-valuemax="100" aria-valuenow="${frac}"
        aria-label="${esc(t("col.memory"))} ${frac}%"><span style="width:${frac}%"></span></span>
        ${esc(t("mem.of", { used: bytes(used * 1048576), total: bytes(cap * 1048576) }))}</td>
      <td>${esc(h.vms_running)}</td><td>${h.maintenance ? t("on") : t("off")}</td>
      <td>${can("hosts") && h.state !== "down" ? maint : ""}</td></tr>`;
  });
  return table(
    "hosts",
    ["col.name", "col.state", "col.cpus", "col.cpu", "col.load", "col.memory", "col.vms", "col.maintenance", "col.actions"],
    rows,
    t("dash.hosts"),
  );
}

// -- VMs -----------------------------------------------------------------------------------------------------

function heartbeat(v) {
  if (v.heartbeat_age_s === null || v.heartbeat_age_s === undefined || !["running", "paused", "migrating"].includes(v.state)) {
    return `<span class="muted">${esc(t("hb.none"))}</span>`;
  }
  const age = Math.round(v.heartbeat_age_s);
  const fresh = v.heartbeat_age_s < HEARTBEAT_FRESH_S;
  const word = fresh ? t("hb.fresh", { age }) : t("hb.stale", { age });
  const guest = v.uptime_s !== null && v.uptime_s !== undefined ? duration(v.uptime_s) : "";
  return `<span class="hb ${fresh ? "ok" : "stale"}">${esc(word)}</span><div class="small muted">${esc(guest)}</div>`;
}

function disks(v) {
  return (v.disks || [])
    .map((d) => {
      const m = d.mirror ? ` ${badge(d.mirror.state)}` : "";
      return `<span class="disk">${esc(d.id)} ${esc(bytes(d.size_bytes))}${esc(d.pool && d.pool !== "default" ? ` @${d.pool}` : "")}${m}</span>`;
    })
    .join("<br>");
}

function vmCharts(v) {
  const pts = (data.hist && data.hist.vms && data.hist.vms[v.name]) || [];
  if (!["running", "paused", "migrating", "shutting_down"].includes(v.state)) return ["", ""];
  const last = pts.length ? pts[pts.length - 1] : null;
  const label = last ? t("chart.cpu", { pct: last.cpu_pct.toFixed(1) }) : t("chart.collecting");
  const cpu = `${sparkline(pts.map((p) => p.cpu_pct), { max: Math.max(100, ...pts.map((p) => p.cpu_pct)), label })}
    <span class="figure">${last ? `${last.cpu_pct.toFixed(1)}%` : ""}</span>
    <div class="muted small">${last ? esc(bytes(last.rss_bytes)) : ""}</div>`;
  if (!last) return [cpu, `<span class="muted">${esc(t("chart.collecting"))}</span>`];
  const note = data.hist.notes && data.hist.notes[v.name];
  const hasNet = (v.nics || []).some((n) => n.network !== "user");
  const net = hasNet
    ? t("io.net", { rx: bytes(last.net_tx_bps), tx: bytes(last.net_rx_bps) })
    : t("io.nonet");
  const io = `<div class="small">${esc(t("io.disk", { r: bytes(last.disk_read_bps), w: bytes(last.disk_write_bps) }))}</div>
    <div class="small muted" title="${esc(note || "")}">${esc(net)}</div>`;
  return [cpu, io];
}

function vmActions(v) {
  const out = [];
  if (can("operate")) {
    if (["stopped", "crashed"].includes(v.state)) out.push(button("start", v.name, t("act.start"), "primary"));
    if (["running", "paused"].includes(v.state)) out.push(button("shutdown", v.name, t("act.shutdown")));
    if (["running", "paused", "shutting_down", "starting"].includes(v.state)) {
      out.push(button("stop", v.name, t("act.stop"), "danger"));
    }
    if (can("hosts") && v.state === "running" && data.hosts.filter((h) => h.state === "up" && !h.maintenance).length > 1) {
      out.push(button("migrate", v.name, t("act.migrate")));
    }
  }
  if (can("console") && ["running", "paused"].includes(v.state)) {
    const aria = esc(t("act.label", { action: t("act.console"), target: v.name }));
    out.push(`<a class="action" href="/ui/console.html?vm=${encodeURIComponent(v.name)}" data-key="console:${esc(v.name)}"
      aria-label="${aria}" title="${aria}">${esc(t("act.console"))}</a>`);
  }
  return out.join(" ");
}

// The VM list's filters (state, tag: the tags typed, separated by spaces or commas, all of them), as GET /v1/vms takes them.
const VM_STATES = ["running", "stopped", "crashed", "paused", "starting", "shutting_down", "migrating", "unknown"];

function vmShown(v) {
  const state = root.querySelector("#vm-filter-state").value;
  const tags = root.querySelector("#vm-filter-tag").value.split(/[\s,]+/).filter(Boolean);
  return (!state || v.state === state) && tags.every((x) => (v.tags || []).includes(x));
}

function tagChips(v) {
  return (v.tags || []).map((x) => `<span class="state tag">${esc(x)}</span>`).join(" ");
}

function vmsTable() {
  const ledger = Object.fromEntries(data.uptime.map((u) => [u.name, u]));
  const rows = data.vms
    .filter((v) => v.state !== "template" && vmShown(v))
    .map((v) => {
      const u = ledger[v.name];
      const [cpu, io] = vmCharts(v);
      const st = badge(v.state);
      return `<tr data-vm="${esc(v.name)}" data-state="${esc(v.state)}"><th scope="row">${esc(v.name)}
        ${v.description ? `<div class="muted small">${esc(v.description)}</div>` : ""}
        ${v.tags && v.tags.length ? `<div class="small vm-tags" aria-label="${esc(t("filter.tag"))}">${tagChips(v)}</div>` : ""}</th>
        <td class="vm-state">${st}${v.last_error && v.state === "crashed" ? `<div class="small error">${esc(v.last_error)}</div>` : ""}</td>
        <td>${esc(v.host || "—")}</td><td>${esc(v.vcpus)} vCPU · ${esc(bytes(v.memory_mib * 1048576))}</td>
        <td>${esc(u && u.running ? duration(u.uptime_s) : "—")}${u && u.crashes ? ` <span class="small error">×${esc(u.crashes)}</span>` : ""}</td>
        <td>${heartbeat(v)}</td>
        <td>${v.ha ? `${esc(t("yes"))} (${esc(v.priority)})${v.ha_armed ? "" : " *"}` : esc(t("no"))}</td>
        <td>${disks(v)}</td><td class="chart">${cpu}</td><td>${io}</td><td class="acts">${vmActions(v)}</td></tr>`;
    });
  return table(
    "vms",
    ["col.name", "col.state", "col.host", "col.size", "col.uptime", "col.heartbeat", "col.ha", "col.disks", "col.cpu", "col.io", "col.actions"],
    rows,
    t("dash.vms"),
  );
}

// -- backups: each VM's newest generation, its copy on the backup server, its latest restore drill --------------

const secs = (v) => (v === null || v === undefined ? "—" : `${Number(v).toFixed(1)} s`);

function drillCell(d) {
  if (!d) return `<span class="muted">${esc(t("drill.never"))}</span>`;
  const check = d.check ? t("drill.check", { code: d.check.exitcode }) : t("drill.nocheck");
  const why = !d.ok && d.error ? `<div class="small error">${esc(d.error)}</div>` : "";
  return `<span class="drill" data-ok="${d.ok}">${badge(d.ok ? "passed" : "failed", d.ok ? "ok" : "failed")}</span> ${esc(when(d.at))}
    <div class="small">${esc(t("drill.times", { gen: d.generation, restore: secs(d.restore_s), boot: secs(d.boot_s) }))}</div>
    <div class="small ${d.check && d.check.exitcode !== 0 ? "error" : "muted"}">${esc(check)}</div>${why}`;
}

const BACKUP_CLASS = { ok: "ok", late: "warning", not_copied: "warning", never: "failed", damaged: "failed",
  lock_short: "warning", unknown: "unknown" };

function backupsTable() {
  const rows = data.backups.map((b) => {
    const newest = b.last_generation === null ? "—" : `#${b.last_generation} · ${when(b.last_at)}`;
    const copy = b.offsite_generation === null ? "—" : `#${b.offsite_generation}${b.locked_until ? ` · ${t("backup.locked", { until: when(b.locked_until) })}` : ""}`;
    return `<tr data-backup-vm="${esc(b.vm)}"><th scope="row">${esc(b.vm)}</th>
      <td>${badge(`backup_${b.state}`, BACKUP_CLASS[b.state])}${b.reason ? `<div class="small muted">${esc(b.reason)}</div>` : ""}</td>
      <td>${esc(newest)}</td><td>${esc(copy)}</td><td class="drill-cell">${drillCell(b.drill)}</td></tr>`;
  });
  return table("backups", ["col.name", "col.state", "col.newest", "col.offsite", "col.drill"], rows, t("dash.backups"));
}

// -- pools, desktops, jobs, events ---------------------------------------------------------------------------

function poolsTable() {
  const rows = data.pools.map((p) => {
    const hosts = (p.hosts || [])
      .map((h) => `<div>${esc(h.host)}: ${badge(h.state)} ${esc(bytes(h.free_bytes))} / ${esc(bytes(h.capacity_bytes))}</div>`)
      .join("");
    return `<tr data-pool="${esc(p.name)}"><th scope="row">${esc(p.name)}</th><td>${hosts}</td>
      <td>${esc(p.shared ? t("yes") : t("no"))}</td><td>${esc(p.disks)}</td></tr>`;
  });
  return table("pools", ["col.name", "col.free", "col.shared", "col.disks"], rows, t("dash.pools"));
}

function desktopsTable() {
  const rows = data.desktops.map(
    (p) => `<tr data-desktop-pool="${esc(p.name)}"><th scope="row">${esc(p.name)}</th><td>${badge(p.state)}</td>
      <td>${esc(p.template)}</td><td>${esc(p.size)}</td><td>${esc(p.in_use)}</td><td>${esc(p.free_ready)}</td></tr>`,
  );
  return table(
    "desktop-pools",
    ["col.name", "col.state", "col.template", "col.desktops", "col.inuse", "col.ready"],
    rows,
    t("dash.desktops"),
  );
}

function jobsTable() {
  const rows = [...data.jobs].reverse().map((j) => {
    const pct = Math.round((j.progress || 0) * 100);
    const msg = j.state === "failed" && j.error ? j.error.message : j.step;
    return `<tr data-job="${esc(j.id)}"><td>${esc(clock(j.created_at))}</td><td>${esc(j.kind)}</td><td>${esc(j.vm || "—")}</td>
      <td>${badge(j.state, j.state === "running" ? "running-job" : j.state)}</td>
      <td class="nowrap"><span class="progress" role="progressbar" aria-valuemin="0" aria-valuemax="100" aria-valuenow="${pct}"
        aria-label="${esc(j.kind)} ${pct}%"><div style="width:${pct}%"></div></span> ${pct}%</td>
      <td class="small">${esc(msg)}</td></tr>`;
  });
  return table("jobs", ["col.time", "col.kind", "col.vm", "col.state", "col.progress", "col.step"], rows, t("dash.jobs"));
}

function eventsTable() {
  const rows = [...data.events].reverse().map(
    (e) => `<tr><td>${esc(clock(e.time))}</td><td>${badge(e.severity)}</td><td>${esc(e.subject)}</td>
      <td class="small">${esc(e.message)}</td></tr>`,
  );
  return table("events", ["col.time", "col.severity", "col.subject", "col.message"], rows, t("dash.events"));
}

// The audit trail's latest records, for those who may read it (administrators, auditors).
function auditTable() {
  const rows = [...data.audit].reverse().map((a) => {
    const ok = a.result && a.result.ok;
    const actor = a.actor ? `${a.actor.name} (${t(`role.${a.actor.role}`)})` : "—";
    return `<tr data-seq="${esc(a.seq)}"><td>${esc(clock(Date.parse(a.time) / 1000))}</td><td>${esc(actor)}</td>
      <td>${esc(a.action)}</td><td>${esc(a.target)}</td>
      <td>${badge(ok ? "ok" : "failed")}${!ok && a.result ? ` <span class="small">${esc(a.result.message || a.result.code || "")}</span>` : ""}</td>
      <td class="small muted">${esc(a.source)}</td></tr>`;
  });
  return table("audit", ["col.time", "col.actor", "col.action", "col.subject", "col.result", "col.source"], rows, t("dash.audit"));
}

// -- actions -------------------------------------------------------------------------------------------------

// Ask before a destructive action; resolves with the extra choice (the migration's host) or null if cancelled.
function confirmDialog(message, hosts) {
  const dlg = root.querySelector("#confirm");
  root.querySelector("#confirm-msg").textContent = message;
  const extra = root.querySelector("#confirm-extra");
  extra.innerHTML = "";
  let select = null;
  if (hosts) {
    select = document.createElement("select");
    select.id = "migrate-to";
    select.setAttribute("aria-label", message);
    select.add(new Option(t("migrate.auto"), ""));
    for (const h of hosts) select.add(new Option(h, h));
    extra.appendChild(select);
  }
  return new Promise((resolve) => {
    dlg.addEventListener(
      "close",
      () => resolve(dlg.returnValue === "ok" ? { to: select ? select.value : null } : null),
      { once: true },
    );
    dlg.returnValue = "";
    dlg.showModal();
    (select || root.querySelector("#confirm-ok")).focus();
  });
}

// A job in the live card, followed to its end (then the dashboard is read again).
function trackLive(job, title) {
  root.querySelector("#live-card").hidden = false;
  trackJob(root.querySelector("#live"), job, title, () => refresh());
}

async function onClick(ev) {
  const btn = ev.target.closest("button[data-act]");
  if (!btn) return;
  const act = btn.dataset.act;
  const target = btn.dataset.target;
  let path;
  let body;
  let label = t(`act.${act.replace("-", "_")}`);
  if (act === "start") {
    path = `/v1/vms/${encodeURIComponent(target)}/actions/start`;
  } else if (act === "shutdown" || act === "stop") {
    if (!(await confirmDialog(t(`confirm.${act}`, { vm: target })))) return;
    path = `/v1/vms/${encodeURIComponent(target)}/actions/${act}`;
  } else if (act === "migrate") {
    const vm = data.vms.find((v) => v.name === target);
    const hosts = data.hosts.filter((h) => h.state === "up" && !h.maintenance && h.name !== (vm && vm.host)).map((h) => h.name);
    const choice = await confirmDialog(t("confirm.migrate", { vm: target }), hosts);
    if (!choice) return;
    path = `/v1/vms/${encodeURIComponent(target)}/migrate`;
    body = choice.to ? { to: choice.to } : {};
  } else if (act === "maint-on" || act === "maint-off") {
    const on = act === "maint-on";
    if (!(await confirmDialog(t(on ? "confirm.maint_on" : "confirm.maint_off", { host: target })))) return;
    path = `/v1/hosts/${encodeURIComponent(target)}/maintenance?on=${on}`;
    label = t(on ? "act.maint_on" : "act.maint_off");
  } else {
    return;
  }
  btn.disabled = true;
  const live = root.querySelector("#live");
  root.querySelector("#live-card").hidden = false;
  try {
    const res = await post(path, body);
    if (res && res.job) trackLive(res.job, t("act.label", { action: label, target }));
    refresh();
  } catch (e) {
    const p = document.createElement("p");
    p.className = "error";
    p.setAttribute("role", "alert");
    p.textContent = `${t("act.label", { action: label, target })} — ${e.message}`;
    live.prepend(p);
    btn.disabled = false;
  }
}
