// Small inline SVG charts (no chart library): a sparkline of the last minutes of one figure.

// values: numbers, oldest first. max: the top of the scale (default: the largest value, at least 1).
export function sparkline(values, { max, label = "", cls = "" } = {}) {
  const w = 120;
  const h = 28;
  const vals = values.filter((v) => Number.isFinite(v));
  const top = Math.max(max || 0, ...vals, 1e-9);
  let body = "";
  if (vals.length >= 2) {
    const step = w / (vals.length - 1);
    const pts = vals.map((v, i) => `${(i * step).toFixed(1)},${(h - 2 - (v / top) * (h - 4)).toFixed(1)}`);
    body = `<polygon class="area" points="0,${h} ${pts.join(" ")} ${w},${h}"/><polyline points="${pts.join(" ")}"/>`;
  } else {
    body = `<line class="empty" x1="0" y1="${h - 2}" x2="${w}" y2="${h - 2}"/>`;
  }
  const safe = String(label).replace(/[&<>"]/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;" })[c]);
  return `<svg class="spark ${cls}" viewBox="0 0 ${w} ${h}" width="${w}" height="${h}" role="img" aria-label="${safe}"><title>${safe}</title>${body}</svg>`;
}
