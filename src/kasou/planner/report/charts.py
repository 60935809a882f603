"""Charts as a list of drawing primitives, rendered to inline SVG (the HTML page) and to PDF operators.

No plotting library: three chart kinds (lines, grouped bars, small multiples of grouped bars) are
enough for the report, and one description drawn twice keeps the page and the PDF alike.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from html import escape

BEFORE, AFTER = "#b5523b", "#2f6f9f"  # before (physical) and after (kasou)
PALETTE = ("#2f6f9f", "#e0a030", "#6a9f4f", "#8c6bb1")
GRID, INK, MUTED = "#d9d9d9", "#222222", "#666666"


@dataclass(frozen=True)
class Rect:
    x: float
    y: float
    w: float
    h: float
    fill: str


@dataclass(frozen=True)
class Line:
    points: tuple[tuple[float, float], ...]
    stroke: str
    width: float = 1.0


@dataclass(frozen=True)
class Text:
    x: float
    y: float  # baseline
    text: str
    size: float = 9
    anchor: str = "start"  # start, middle, end
    fill: str = INK
    bold: bool = False
    rotate: bool = False  # 90 degrees counter-clockwise (a y-axis title)


@dataclass
class Chart:
    width: float
    height: float
    title: str
    shapes: list[Rect | Line | Text] = field(default_factory=list)

    def svg(self) -> str:
        size = f'viewBox="0 0 {self.width:g} {self.height:g}" width="{self.width:g}" height="{self.height:g}"'
        parts = [f'<svg xmlns="http://www.w3.org/2000/svg" {size} role="img" aria-label="{escape(self.title)}">']
        for s in self.shapes:
            if isinstance(s, Rect):
                parts.append(f'<rect x="{s.x:.1f}" y="{s.y:.1f}" width="{max(0, s.w):.1f}" height="{max(0, s.h):.1f}" '
                             f'fill="{s.fill}"/>')  # fmt: skip
            elif isinstance(s, Line):
                pts = " ".join(f"{x:.1f},{y:.1f}" for x, y in s.points)
                parts.append(f'<polyline points="{pts}" fill="none" stroke="{s.stroke}" stroke-width="{s.width:g}"/>')
            else:
                weight = ' font-weight="bold"' if s.bold else ""
                rot = f' transform="rotate(-90 {s.x:.1f} {s.y:.1f})"' if s.rotate else ""
                parts.append(f'<text x="{s.x:.1f}" y="{s.y:.1f}" font-size="{s.size:g}" text-anchor="{s.anchor}" '
                             f'fill="{s.fill}"{weight}{rot} font-family="Helvetica, Arial, sans-serif">'
                             f"{escape(s.text)}</text>")  # fmt: skip
        parts.append("</svg>")
        return "".join(parts)


def _nice_max(v: float) -> float:
    if v <= 0:
        return 1.0
    exp = 10 ** math.floor(math.log10(v))
    for m in (1, 1.2, 1.5, 2, 2.5, 3, 4, 5, 6, 8, 10):
        if m * exp >= v:
            return m * exp
    return 10 * exp


def _frame(c: Chart, left: float, top: float, right: float, bottom: float, ymax: float, ylabel: str,
           fmt: str = "{:,.4g}") -> None:  # fmt: skip
    c.shapes.append(Text(left, 14, c.title, 11, bold=True))
    for k in range(5):
        v = ymax * k / 4
        y = bottom - (bottom - top) * k / 4
        c.shapes.append(Line(((left, y), (right, y)), GRID, 0.6))
        c.shapes.append(Text(left - 4, y + 3, fmt.format(v), 8, "end", MUTED))
    c.shapes.append(Text(12, (top + bottom) / 2, ylabel, 8, "middle", MUTED, rotate=True))


def _legend(c: Chart, x: float, y: float, entries: Sequence[tuple[str, str]]) -> None:
    for label, color in entries:
        c.shapes.append(Rect(x, y - 8, 10, 8, color))
        c.shapes.append(Text(x + 14, y, label, 8))
        x += 22 + 5.2 * len(label)


def line_chart(title: str, xlabels: Sequence[str], series: Sequence[tuple[str, str, Sequence[float]]],
               ylabel: str, width: float = 520, height: float = 240) -> Chart:  # fmt: skip
    """Lines over categories (years): series are (label, colour, values)."""
    c = Chart(width, height, title)
    left, top, right, bottom = 64, 34, width - 12, height - 40
    ymax = _nice_max(max((v for _, _, vals in series for v in vals), default=1))
    _frame(c, left, top, right, bottom, ymax, ylabel)
    n = len(xlabels)
    step = (right - left) / max(1, n - 1)
    for i, lab in enumerate(xlabels):
        c.shapes.append(Text(left + i * step, bottom + 14, lab, 8, "middle", MUTED))
    for _label, color, vals in series:
        pts = tuple((left + i * step, bottom - (bottom - top) * v / ymax) for i, v in enumerate(vals))
        c.shapes.append(Line(pts, color, 2))
        for x, y in pts:
            c.shapes.append(Rect(x - 2.5, y - 2.5, 5, 5, color))
    _legend(c, left, height - 8, [(label, color) for label, color, _ in series])
    return c


def bar_chart(title: str, xlabels: Sequence[str], series: Sequence[tuple[str, str, Sequence[float]]],
              ylabel: str, ymax: float | None = None, width: float = 520, height: float = 240,
              fmt: str = "{:,.4g}") -> Chart:  # fmt: skip
    """Grouped bars: one group per category, one bar per series."""
    c = Chart(width, height, title)
    left, top, right, bottom = 64, 34, width - 12, height - 40
    top_v = ymax or _nice_max(max((v for _, _, vals in series for v in vals), default=1))
    _frame(c, left, top, right, bottom, top_v, ylabel, fmt)
    n, k = max(1, len(xlabels)), max(1, len(series))
    group = (right - left) / n
    bar = group * 0.8 / k
    for i, lab in enumerate(xlabels):
        c.shapes.append(Text(left + group * (i + 0.5), bottom + 14, lab, 8 if n < 16 else 6, "middle", MUTED))
        for j, (_label, color, vals) in enumerate(series):
            v = min(vals[i], top_v)
            h = (bottom - top) * v / top_v
            c.shapes.append(Rect(left + group * i + group * 0.1 + j * bar, bottom - h, bar * 0.92, h, color))
    _legend(c, left, height - 8, [(label, color) for label, color, _ in series])
    return c
