"""A small PDF writer: A4 pages of text and the report's charts, in PDF's own standard fonts.

Enough for a printable report with no dependency: Helvetica and Helvetica-Bold (never embedded,
every PDF reader has them), rectangles, lines and text. Text is Latin-1; other characters print as '?'.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field

from kasou.planner.report.charts import Chart, Line, Rect, Text

A4 = (595.0, 842.0)
MARGIN = 48.0


def _rgb(color: str) -> str:
    c = color.lstrip("#")
    r, g, b = (int(c[i : i + 2], 16) / 255 for i in (0, 2, 4))
    return f"{r:.3f} {g:.3f} {b:.3f}"


def _pdf_text(s: str) -> str:
    s = s.encode("latin-1", "replace").decode("latin-1")
    return s.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)")


def text_width(s: str, size: float) -> float:
    """An estimate of Helvetica's width (average glyph 0.52 em)."""
    return len(s) * size * 0.52


@dataclass
class Page:
    ops: list[str] = field(default_factory=list)
    y: float = A4[1] - MARGIN  # the cursor: where the next line's top goes

    def text(self, x: float, y: float, s: str, size: float = 10, bold: bool = False, color: str = "#222222",
             anchor: str = "start", rotate: bool = False) -> None:  # fmt: skip
        if anchor == "middle":
            x -= text_width(s, size) / 2 if not rotate else 0
        elif anchor == "end":
            x -= text_width(s, size) if not rotate else 0
        font = "F2" if bold else "F1"
        if rotate:
            w = text_width(s, size) / 2
            self.ops.append(f"BT /{font} {size:g} Tf {_rgb(color)} rg 0 1 -1 0 {x:.2f} {y - w:.2f} Tm "
                            f"({_pdf_text(s)}) Tj ET")  # fmt: skip
        else:
            self.ops.append(f"BT /{font} {size:g} Tf {_rgb(color)} rg {x:.2f} {y:.2f} Td ({_pdf_text(s)}) Tj ET")

    def line(self, s: str, size: float = 10, bold: bool = False, indent: float = 0, color: str = "#222222",
             mono: bool = False) -> None:  # fmt: skip
        self.y -= size * 1.35
        if mono:  # a table row: Courier keeps the columns
            self.ops.append(f"BT /F3 {size:g} Tf {_rgb(color)} rg {MARGIN + indent:.2f} {self.y:.2f} Td "
                            f"({_pdf_text(s)}) Tj ET")  # fmt: skip
            return
        self.text(MARGIN + indent, self.y, s, size, bold, color)

    def wrapped(self, s: str, size: float = 9, indent: float = 0, width: float | None = None) -> None:
        room = (width or (A4[0] - 2 * MARGIN - indent)) / (size * 0.52)
        words, cur = s.split(), ""
        for w in words:
            if cur and len(cur) + 1 + len(w) > room:
                self.line(cur, size, indent=indent)
                cur = w
            else:
                cur = f"{cur} {w}".strip()
        if cur:
            self.line(cur, size, indent=indent)

    def chart(self, c: Chart, x: float = MARGIN, scale: float | None = None) -> None:
        """Draw ``c`` below the cursor, scaled to the page width."""
        s = scale or min(1.0, (A4[0] - 2 * MARGIN) / c.width)
        top = self.y - 6
        bottom = top - c.height * s

        def px(v: float) -> float:
            return x + v * s

        def py(v: float) -> float:
            return top - v * s

        for sh in c.shapes:
            if isinstance(sh, Rect):
                self.ops.append(f"{_rgb(sh.fill)} rg {px(sh.x):.2f} {py(sh.y + sh.h):.2f} {sh.w * s:.2f} "
                                f"{sh.h * s:.2f} re f")  # fmt: skip
            elif isinstance(sh, Line):
                pts = [f"{px(a):.2f} {py(b):.2f}" for a, b in sh.points]
                path = f"{pts[0]} m " + " ".join(f"{p} l" for p in pts[1:])
                self.ops.append(f"{_rgb(sh.stroke)} RG {sh.width * s:.2f} w {path} S")
            elif isinstance(sh, Text):
                self.text(px(sh.x), py(sh.y), sh.text, sh.size * s, sh.bold, sh.fill, sh.anchor, sh.rotate)
        self.y = bottom - 8


@dataclass
class Document:
    pages: list[Page] = field(default_factory=list)

    def page(self) -> Page:
        p = Page()
        self.pages.append(p)
        return p

    def render(self, title: str = "") -> bytes:
        objs: list[bytes] = []

        def add(body: bytes) -> int:
            objs.append(body)
            return len(objs)

        catalog = add(b"")  # filled below
        pages_id = add(b"")
        f1 = add(b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica /Encoding /WinAnsiEncoding >>")
        f2 = add(b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica-Bold /Encoding /WinAnsiEncoding >>")
        f3 = add(b"<< /Type /Font /Subtype /Type1 /BaseFont /Courier /Encoding /WinAnsiEncoding >>")
        kids = []
        for n, p in enumerate(self.pages, start=1):
            foot = _pdf_text(f"{title}  -  page {n} of {len(self.pages)}")
            footer = f"BT /F1 8 Tf 0.4 0.4 0.4 rg {MARGIN:.0f} 24 Td ({foot}) Tj ET"
            data = zlib.compress("\n".join([*p.ops, footer]).encode("latin-1", "replace"))
            content = add(b"<< /Length %d /Filter /FlateDecode >>\nstream\n" % len(data) + data + b"\nendstream")
            kids.append(add(
                f"<< /Type /Page /Parent {pages_id} 0 R /MediaBox [0 0 {A4[0]:g} {A4[1]:g}] /Resources << /Font "
                f"<< /F1 {f1} 0 R /F2 {f2} 0 R /F3 {f3} 0 R >> >> /Contents {content} 0 R >>".encode()
            ))  # fmt: skip
        objs[catalog - 1] = f"<< /Type /Catalog /Pages {pages_id} 0 R >>".encode()
        objs[pages_id - 1] = (f"<< /Type /Pages /Kids [{' '.join(f'{k} 0 R' for k in kids)}] "
                              f"/Count {len(kids)} >>").encode()  # fmt: skip
        info = add(f"<< /Title ({_pdf_text(title)}) /Producer (kasou plan) >>".encode("latin-1", "replace"))
        out = bytearray(b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n")
        offsets = []
        for i, body in enumerate(objs, start=1):
            offsets.append(len(out))
            out += f"{i} 0 obj\n".encode() + body + b"\nendobj\n"
        xref = len(out)
        out += f"xref\n0 {len(objs) + 1}\n0000000000 65535 f \n".encode()
        for off in offsets:
            out += f"{off:010d} 00000 n \n".encode()
        out += f"trailer\n<< /Size {len(objs) + 1} /Root {catalog} 0 R /Info {info} 0 R >>\n".encode()
        out += f"startxref\n{xref}\n%%EOF\n".encode()
        return bytes(out)
