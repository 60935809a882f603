"""The access-log review (:class:`kasou.control.review.Review`) as one self-contained HTML page, in Japanese or
English: inline CSS, no script, no external resource; prints on A4 with a signature block (reviewed by, date, seal).
Every value from the log is HTML-escaped."""

from __future__ import annotations

import json
from collections.abc import Iterable
from html import escape
from importlib import resources
from typing import Any, Literal

from kasou.control.review import Line, Review

Lang = Literal["ja", "en"]

#: The labels, Japanese and English, and the names of permission changes (review_labels.json beside this file).
_TEXT = json.loads(resources.files("kasou.api").joinpath("review_labels.json").read_text(encoding="utf-8"))
LABELS: dict[str, dict[str, str]] = _TEXT["labels"]
KINDS: dict[str, dict[str, str]] = _TEXT["kinds"]

CSS = """
@page { size: A4; margin: 15mm 12mm; }
body { font: 10pt/1.45 "Noto Sans CJK JP", "Noto Sans JP", "Hiragino Sans", "Yu Gothic", sans-serif; color: #111;
       max-width: 190mm; margin: 0 auto; }
h1 { font-size: 16pt; margin: 0 0 2mm; } h2 { font-size: 12pt; margin: 6mm 0 2mm; border-bottom: 1px solid #444; }
table { border-collapse: collapse; width: 100%; margin: 1mm 0 2mm; }
th, td { border: 1px solid #999; padding: 1mm 1.5mm; text-align: left; vertical-align: top; font-size: 8.5pt; }
th { background: #eee; } tr { page-break-inside: avoid; } h2 { page-break-after: avoid; }
.meta td { border: none; padding: 0.5mm 2mm 0.5mm 0; font-size: 10pt; } .meta th { border: none; background: none; }
.verdict { padding: 2mm 3mm; border: 2px solid; font-weight: bold; margin: 2mm 0; }
.verdict.ok { border-color: #1a7f37; color: #1a7f37; } .verdict.bad { border-color: #c62828; color: #c62828; }
.bad { color: #c62828; font-weight: bold; } .muted { color: #555; } .num { text-align: right; }
.sign { margin-top: 10mm; page-break-inside: avoid; } .sign td { height: 14mm; font-size: 10pt; }
.sign td.seal { width: 25mm; text-align: center; color: #777; } pre { white-space: pre-wrap; margin: 0; font: inherit; }
"""


def render(review: Review, lang: Lang = "ja") -> str:
    lab = LABELS[lang]

    def t(key: str, **kw: Any) -> str:
        text = lab[key]
        for k, v in kw.items():
            text = text.replace("{" + k + "}", str(v))
        return escape(text)

    def table(heads: list[str], rows: Iterable[list[str]], cls: str = "") -> str:
        body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
        if not body:
            return f'<p class="muted">{t("none")}</p>'
        th = "".join(f"<th>{t(h)}</th>" for h in heads)
        return f'<table class="{cls}"><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>'

    def e(v: Any) -> str:
        return escape("" if v is None else str(v))

    def result(ok: bool) -> str:
        return t("ok") if ok else f'<span class="bad">{t("refused")}</span>'

    def cut(name: str) -> str:
        return f'<p class="muted">{t("truncated", n=500)}</p>' if name in review.truncated else ""

    def lines(items: list[Line], name: str) -> str:
        rows = [
            [e(x.local), e(x.actor or "-"), e(x.source or "-"), e(x.action), e(x.target), result(x.ok), e(x.message)]
            for x in items
        ]
        return cut(name) + table(
            ["c.time", "c.user", "c.source", "c.action", "c.target", "c.result", "c.message"], rows
        )

    v = review.verify
    verdict = (
        f'<div class="verdict ok">{t("intact")}</div>'
        if v.ok
        else f'<div class="verdict bad">{t("tampered")}: {e(v.problem.kind if v.problem else "")} '
        f"seq {e(v.problem.seq if v.problem else '')} — {e(v.problem.message if v.problem else '')}</div>"
    )
    chain = t(
        "chain",
        records=v.records,
        first=v.first_seq or "-",
        last=v.last_seq or "-",
        cps=v.checkpoints,
        anchors=v.anchors,
        unsealed=v.unsealed,
    )
    dept = ", ".join(review.department) if review.department else lab["all_departments"]
    meta = [
        ("period", f"{review.since_local} — {review.until_local}"),
        ("tz", review.tz),
        ("department", dept),
        ("generated", review.generated_at),
        ("records", str(review.records)),
    ]
    out = [
        f'<!doctype html><html lang="{lang}"><head><meta charset="utf-8"><title>{t("title")}</title>'
        f"<style>{CSS}</style></head><body>",
        f'<h1>{t("title")}</h1><p class="muted">{t("site")}</p>',
        '<table class="meta">' + "".join(f"<tr><th>{t(k)}</th><td>{e(val)}</td></tr>" for k, val in meta) + "</table>",
        f'<h2 id="verify">{t("verify")}</h2>{verdict}<p>{chain}</p>',
    ]
    u = review.unusual
    weekend = lab["unusual_weekend"] if u.weekends else ""
    summary = [
        (t("signins"), sum(s.count for s in review.signins)),
        (t("failed"), review.failed_total),
        (t("lockouts"), len(review.lockouts)),
        (t("break_glass"), len(review.break_glass)),
        (t("windows"), len(review.windows)),
        (t("consoles"), len(review.consoles)),
        (t("perms"), len(review.permission_changes)),
        (t("unusual"), u.signins + u.actions),
    ]
    out.append(
        f'<h2 id="summary">{t("summary")}</h2><table><tbody>'
        + "".join(f'<tr><th>{k}</th><td class="num" data-count="{n}">{n}</td></tr>' for k, n in summary)
        + "</tbody></table>"
    )
    rows = [
        [e(s.user), e(s.role), e(s.source or "-"), f'<span class="num">{s.count}</span>', e(s.first), e(s.last)]
        for s in review.signins
    ]
    out.append(
        f'<h2 id="signins">{t("signins")}</h2>'
        + table(["c.user", "c.role", "c.source", "c.count", "c.first", "c.last"], rows)
    )
    out.append(
        f'<h2 id="failed">{t("failed")}</h2><p>{t("failed_total", n=review.failed_total)}</p>'
        + lines(review.failed_signins, "failed")
    )
    out.append(f'<h2 id="lockouts">{t("lockouts")}</h2>' + lines(review.lockouts, "lockouts"))
    out.append(f'<h2 id="break-glass">{t("break_glass")}</h2>')
    if review.department:
        out.append(f'<p class="muted">{t("site_only")}</p>')
    else:
        rows = [
            [
                e(b.line.local),
                e(b.line.source or "-"),
                e(b.line.target),
                (
                    f"{t('yes')}: {e(b.acknowledged_by)} {e(b.acknowledged_at)}"
                    if b.acknowledged
                    else f'<span class="bad">{t("no")}</span>'
                ),
            ]
            for b in review.break_glass
        ]
        out.append(cut("break_glass") + table(["c.time", "c.source", "c.target", "c.ack"], rows))
    rows = [
        [
            e(w.id),
            e(w.vendor),
            e(w.state),
            e(", ".join(w.vms)),
            e(f"{w.starts} — {w.ends}"),
            f"<pre>{e(w.plan)}</pre>",
            t("done_line", actions=w.actions, refused=w.refused)
            + "<br>"
            + e(", ".join(f"{k} x{n}" for k, n in w.summary.items())),
            e(w.decided_by or "-") + "<br>" + t("requested_by", who=w.requested_by),
        ]
        for w in review.windows
    ]
    out.append(
        f'<h2 id="windows">{t("windows")}</h2>'
        + table(["c.window", "c.vendor", "c.state", "c.vms", "c.span", "c.plan", "c.done", "c.approved"], rows)
    )
    rows = [
        [
            e(c.opened),
            e(c.user),
            e(c.vm),
            e(c.source or "-"),
            e(f"{c.duration_s:.0f} s") if c.duration_s is not None else t("open"),
            e(
                f"{c.bytes_from_client if c.bytes_from_client is not None else '-'} / "
                f"{c.bytes_to_client if c.bytes_to_client is not None else '-'}"
            ),
            e(c.recording or "-"),
            e(c.window or "-"),
            result(c.ok) + (f" {e(c.reason)}" if c.reason else ""),
        ]
        for c in review.consoles
    ]
    out.append(
        f'<h2 id="consoles">{t("consoles")}</h2>'
        + cut("consoles")
        + table(
            ["c.time", "c.user", "c.vm", "c.source", "c.duration", "c.bytes", "c.recording", "c.window", "c.result"],
            rows,
        )
    )

    def kinds(k: str) -> str:
        return KINDS.get(lang, {}).get(k, k.replace("_", " "))

    rows = [
        [
            e(p.line.local),
            e(p.line.actor or "-"),
            e(kinds(p.kind)),
            e(p.line.target),
            e(p.line.source or "-"),
            result(p.line.ok),
        ]
        for p in review.permission_changes
    ]
    out.append(
        f'<h2 id="perms">{t("perms")}</h2>'
        + cut("permission_changes")
        + table(["c.time", "c.by", "c.kind", "c.target", "c.source", "c.result"], rows)
    )
    per_user = ", ".join(f"{k} x{n}" for k, n in u.by_user.items())
    out.append(
        f'<h2 id="unusual">{t("unusual")}</h2><p>{t("unusual_def", hours=u.hours, tz=review.tz, weekend=weekend)}'
        f'</p><p data-unusual="{u.signins + u.actions}">{t("unusual_counts", signins=u.signins, actions=u.actions)}'
        f"{'<br>' + e(per_user) if per_user else ''}</p>" + lines(u.lines, "unusual")
    )
    out.append(
        f'<div class="sign"><h2>{t("sign.title")}</h2><p>{t("sign.note")}</p><table><tr><th>{t("sign.by")}</th>'
        f'<td></td><td class="seal" rowspan="2">{t("sign.seal")}</td></tr><tr><th>{t("sign.date")}</th><td></td>'
        "</tr></table></div></body></html>"
    )
    return "\n".join(out)
