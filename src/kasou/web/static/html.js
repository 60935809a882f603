// Small HTML helpers the dashboard's modules share: escaping, and a table of rows with a "none" line.
import { t } from "/ui/i18n.js";

export const esc = (s) =>
  String(s ?? "").replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);

// heads: label keys; rows: "<tr>…</tr>" strings; caption: the table's accessible name.
export function table(id, heads, rows, caption) {
  const th = heads.map((h) => `<th scope="col">${esc(t(h))}</th>`).join("");
  const body = rows.length ? rows.join("") : `<tr><td colspan="${heads.length}" class="muted">${esc(t("dash.none"))}</td></tr>`;
  return `<table id="${id}" aria-label="${esc(caption)}"><thead><tr>${th}</tr></thead><tbody>${body}</tbody></table>`;
}
