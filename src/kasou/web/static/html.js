// Small HTML helpers the UI's modules share: escaping, a moment in the reader's language, and a table of rows with a
// "none" line.
import { lang, t } from "/ui/i18n.js";

export const esc = (s) =>
  String(s ?? "").replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);

// A moment (seconds since the epoch) as the reader's language writes it; "—" for none.
export const when = (epoch, timeStyle = "short") =>
  epoch ? new Date(epoch * 1000).toLocaleString(lang() === "ja" ? "ja-JP" : "en-GB", { dateStyle: "short", timeStyle }) : "—";

// heads: label keys; rows: "<tr>…</tr>" strings; caption: the table's accessible name.
export function table(id, heads, rows, caption) {
  const th = heads.map((h) => `<th scope="col">${esc(t(h))}</th>`).join("");
  const body = rows.length ? rows.join("") : `<tr><td colspan="${heads.length}" class="muted">${esc(t("dash.none"))}</td></tr>`;
  return `<table id="${id}" aria-label="${esc(caption)}"><thead><tr>${th}</tr></thead><tbody>${body}</tbody></table>`;
}
