"""The chart kit of the HTML report: inline SVG charts that need no script library, and escaping.

Every chart is ``<svg class="chart" data-chart="NAME" data-points="N">`` so a test (or a reader's
script) can find it and tell how much it drew; long series are thinned to ``MAX_POINTS``.
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from typing import Any

MAX_POINTS = 400  # a drawn series keeps at most this many points
MAX_BARS = 120  # stacked bars (selections) drawn at most
MAX_GROUPS = 8  # categories of a composition chart; the rest is "other"
PALETTE = ["#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860", "#da8bc3", "#8c8c8c", "#ccb974",
           "#64b5cd"]


def esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def downsample(items: Sequence[Any], limit: int = MAX_POINTS) -> list[Any]:
    """At most ``limit`` items, evenly spaced, keeping the first and the last."""
    n = len(items)
    if n <= limit:
        return list(items)
    if limit < 2:
        return [items[0]]
    return [items[round(k * (n - 1) / (limit - 1))] for k in range(limit)]


def quantile(sorted_values: Sequence[float], q: float) -> float:
    """Linear-interpolated quantile of an already sorted list."""
    if not sorted_values:
        return float("nan")
    pos = q * (len(sorted_values) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def fmt(x: float) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:.4g}"


# ------------------------------------------------------------------------------------------ SVG charts
W, H = 820, 280
ML, MR, MT, MB = 64, 16, 14, 44


def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    if hi <= lo:
        return [lo]
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    first = math.ceil(lo / step) * step
    out, v = [], first
    while v <= hi + step * 1e-9:
        out.append(round(v, 12))
        v += step
    return out


class _Frame:
    """Axes of one chart: maps data to pixels and draws the grid and labels."""

    def __init__(self, xs: Sequence[float], ys: Sequence[float], xlabel: str, ylabel: str,
                 y0: float | None = None, y1: float | None = None):
        xs = [x for x in xs if x is not None and math.isfinite(x)] or [0.0, 1.0]
        ys = [y for y in ys if y is not None and math.isfinite(y)] or [0.0, 1.0]
        self.x0, self.x1 = min(xs), max(xs)
        if self.x1 == self.x0:
            self.x0, self.x1 = self.x0 - 0.5, self.x1 + 0.5
        lo, hi = (min(ys) if y0 is None else y0), (max(ys) if y1 is None else y1)
        if hi == lo:
            lo, hi = lo - (abs(lo) * 0.1 or 0.5), hi + (abs(hi) * 0.1 or 0.5)
        pad = 0.0 if (y0 is not None and y1 is not None) else (hi - lo) * 0.05
        self.y0, self.y1 = lo - (pad if y0 is None else 0), hi + (pad if y1 is None else 0)
        self.xlabel, self.ylabel = xlabel, ylabel

    def px(self, x: float) -> float:
        return ML + (x - self.x0) / (self.x1 - self.x0) * (W - ML - MR)

    def py(self, y: float) -> float:
        return H - MB - (y - self.y0) / (self.y1 - self.y0) * (H - MT - MB)

    def axes(self, xticks: bool = True) -> str:
        parts = []
        for t in _ticks(self.y0, self.y1):
            y = self.py(t)
            parts.append(f'<line x1="{ML}" x2="{W - MR}" y1="{y:.1f}" y2="{y:.1f}" class="grid"/>'
                         f'<text x="{ML - 6}" y="{y + 4:.1f}" class="tick" text-anchor="end">{fmt(t)}</text>')
        if xticks:
            for t in _ticks(self.x0, self.x1, 8):
                x = self.px(t)
                parts.append(f'<text x="{x:.1f}" y="{H - MB + 16}" class="tick" text-anchor="middle">{fmt(t)}</text>')
        parts.append(f'<line x1="{ML}" x2="{W - MR}" y1="{H - MB}" y2="{H - MB}" class="axis"/>'
                     f'<line x1="{ML}" x2="{ML}" y1="{MT}" y2="{H - MB}" class="axis"/>'
                     f'<text x="{(ML + W - MR) / 2}" y="{H - 6}" class="label" text-anchor="middle">'
                     f'{esc(self.xlabel)}</text>'
                     f'<text x="14" y="{(MT + H - MB) / 2}" class="label" text-anchor="middle" '
                     f'transform="rotate(-90 14 {(MT + H - MB) / 2})">{esc(self.ylabel)}</text>')
        return "".join(parts)


def _svg(name: str, points: int, body: str, title: str) -> str:
    return (f'<svg class="chart" data-chart="{esc(name)}" data-points="{points}" viewBox="0 0 {W} {H}" '
            f'role="img" aria-label="{esc(title)}" xmlns="http://www.w3.org/2000/svg"><title>{esc(title)}</title>'
            f'{body}</svg>')


def _legend(names: Sequence[str], dashed: Sequence[bool] | None = None) -> str:
    items = []
    for k, name in enumerate(names):
        style = "border-top-style:dashed" if dashed and dashed[k] else ""
        color = PALETTE[k % len(PALETTE)]
        items.append(f'<span class="key"><i style="border-color:{color};{style}"></i>{esc(name)}</span>')
    return f'<div class="legend">{"".join(items)}</div>'


def line_chart(name: str, series: list[tuple[str, list[tuple[float, float]]]], xlabel: str, ylabel: str,
               marks: Sequence[float] = (), dashed: Sequence[bool] | None = None, title: str = "") -> str:
    """Lines (one per named series of (x, y)); ``marks``: x positions drawn as thin vertical lines."""
    series = [(label, downsample([p for p in pts if p[1] is not None and math.isfinite(p[1])]))
              for label, pts in series]
    xs = [x for _, pts in series for x, _ in pts] + list(marks)
    frame = _Frame(xs, [y for _, pts in series for _, y in pts], xlabel, ylabel)
    body = [frame.axes()]
    for m in downsample(list(marks), MAX_BARS):
        x = frame.px(m)
        body.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{MT}" y2="{H - MB}" class="mark"><title>step '
                    f'{fmt(m)}</title></line>')
    count = 0
    for k, (label, pts) in enumerate(series):
        if not pts:
            continue
        color = PALETTE[k % len(PALETTE)]
        dash = ' stroke-dasharray="6 4"' if dashed and dashed[k] else ""
        path = " ".join(f"{frame.px(x):.1f},{frame.py(y):.1f}" for x, y in pts)
        body.append(f'<polyline points="{path}" fill="none" stroke="{color}" stroke-width="2"{dash}>'
                    f'<title>{esc(label)}</title></polyline>')
        if len(pts) <= 60:
            body.extend(f'<circle cx="{frame.px(x):.1f}" cy="{frame.py(y):.1f}" r="2.5" fill="{color}">'
                        f'<title>{esc(label)}: step {fmt(x)}, {fmt(y)}</title></circle>' for x, y in pts)
        count += len(pts)
    legend = _legend([s[0] for s in series], dashed) if len(series) > 1 or marks else ""
    if marks:
        legend = legend.replace("</div>", '<span class="key"><i class="markkey"></i>marked steps</span></div>')
    return _svg(name, count, "".join(body), title or ylabel) + legend


def stacked_area(name: str, xs: list[float], end: float, names: list[str], shares: list[list[float]],
                 xlabel: str, ylabel: str, title: str = "") -> str:
    """Shares held from each ``xs[i]`` until the next (the last until ``end``), stacked to 1."""
    keep = downsample(list(range(len(xs))))
    xs = [xs[i] for i in keep]
    shares = [shares[i] for i in keep]
    frame = _Frame(xs + [end], [0.0, 1.0], xlabel, ylabel, 0.0, 1.0)
    body = [frame.axes()]
    bounds = xs[1:] + [end]
    base = [0.0] * len(xs)
    for d, dname in enumerate(names):
        top = [base[i] + shares[i][d] for i in range(len(xs))]
        upper, lower = [], []
        for i, x in enumerate(xs):
            upper += [(x, top[i]), (bounds[i], top[i])]
            lower += [(x, base[i]), (bounds[i], base[i])]
        pts = upper + lower[::-1]
        path = " ".join(f"{frame.px(x):.1f},{frame.py(y):.1f}" for x, y in pts)
        body.append(f'<polygon points="{path}" fill="{PALETTE[d % len(PALETTE)]}" fill-opacity="0.85">'
                    f'<title>{esc(dname)}</title></polygon>')
        base = top
    return _svg(name, len(xs), "".join(body), title or ylabel) + _legend(names)


def stacked_bars(name: str, labels: list[str], names: list[str], counts: list[list[float]], xlabel: str,
                 ylabel: str = "share of rows", title: str = "") -> str:
    """One bar per label, split by ``names`` (shares of the bar's total)."""
    keep = downsample(list(range(len(labels))), MAX_BARS)
    labels = [labels[i] for i in keep]
    counts = [counts[i] for i in keep]
    frame = _Frame([0, max(len(labels), 1)], [0.0, 1.0], xlabel, ylabel, 0.0, 1.0)
    body = [frame.axes(xticks=False)]
    slot = (W - ML - MR) / max(len(labels), 1)
    bar = max(slot * 0.8, 1.0)
    every = max(1, math.ceil(len(labels) / 20))
    for i, (label, row) in enumerate(zip(labels, counts)):
        total = sum(row) or 1
        x = ML + i * slot + (slot - bar) / 2
        acc = 0.0
        for d, c in enumerate(row):
            if not c:
                continue
            y_top, y_bot = frame.py(acc + c / total), frame.py(acc)
            body.append(f'<rect x="{x:.1f}" y="{y_top:.1f}" width="{bar:.1f}" height="{y_bot - y_top:.1f}" '
                        f'fill="{PALETTE[d % len(PALETTE)]}"><title>{esc(label)}: {esc(names[d])} {c:g} '
                        f'({100 * c / total:.1f}%)</title></rect>')
            acc += c / total
        if i % every == 0:
            body.append(f'<text x="{x + bar / 2:.1f}" y="{H - MB + 16}" class="tick" text-anchor="middle">'
                        f'{esc(label)}</text>')
    return _svg(name, len(labels), "".join(body), title or ylabel) + _legend(names)


def band_chart(name: str, steps: list[float], bands: list[tuple[float, float, float, float, float]],
               xlabel: str, ylabel: str, ref: float | None = None, title: str = "") -> str:
    """Per step (min, q10, median, q90, max): an outer and an inner band and the median line."""
    keep = downsample(list(range(len(steps))))
    steps = [steps[i] for i in keep]
    bands = [bands[i] for i in keep]
    ys = [v for b in bands for v in b] + ([ref] if ref is not None else [])
    frame = _Frame(steps, ys, xlabel, ylabel)
    body = [frame.axes()]

    def area(lo: int, hi: int, opacity: float, label: str) -> str:
        pts = [(s, b[hi]) for s, b in zip(steps, bands)] + [(s, b[lo]) for s, b in zip(steps, bands)][::-1]
        path = " ".join(f"{frame.px(x):.1f},{frame.py(y):.1f}" for x, y in pts)
        return f'<polygon points="{path}" fill="{PALETTE[0]}" fill-opacity="{opacity}"><title>{label}</title></polygon>'

    if len(steps) == 1:  # a band needs width: widen a single step a little
        steps = [steps[0] - 0.4, steps[0] + 0.4]
        bands = bands * 2
    body.append(area(0, 4, 0.18, "min to max"))
    body.append(area(1, 3, 0.35, "10th to 90th percentile"))
    if ref is not None:
        y = frame.py(ref)
        body.append(f'<line x1="{ML}" x2="{W - MR}" y1="{y:.1f}" y2="{y:.1f}" class="ref"/>')
    path = " ".join(f"{frame.px(s):.1f},{frame.py(b[2]):.1f}" for s, b in zip(steps, bands))
    body.append(f'<polyline points="{path}" fill="none" stroke="#1f3b73" stroke-width="2">'
                '<title>median</title></polyline>')
    legend = ('<div class="legend"><span class="key"><i style="border-color:#1f3b73"></i>median</span>'
              f'<span class="key"><i class="box" style="background:{PALETTE[0]};opacity:.55"></i>'
              '10th-90th percentile</span>'
              f'<span class="key"><i class="box" style="background:{PALETTE[0]};opacity:.25"></i>min-max</span></div>')
    return _svg(name, len(keep), "".join(body), title or ylabel) + legend


def box_pairs(name: str, labels: list[str], groups: list[list[tuple[str, list[float]]]], xlabel: str, ylabel: str,
              title: str = "") -> str:
    """Per label, side-by-side boxes (min, quartiles, median, max) of a few named value lists."""
    keep = downsample(list(range(len(labels))), MAX_BARS // 2)
    labels = [labels[i] for i in keep]
    groups = [groups[i] for i in keep]
    all_values = [v for g in groups for _, vals in g for v in vals]
    frame = _Frame([0, max(len(labels), 1)], all_values, xlabel, ylabel)
    body = [frame.axes(xticks=False)]
    slot = (W - ML - MR) / max(len(labels), 1)
    names: list[str] = []
    count = 0
    for i, (label, group) in enumerate(zip(labels, groups)):
        width = slot * 0.8 / max(len(group), 1)
        for k, (gname, vals) in enumerate(group):
            if gname not in names:
                names.append(gname)
            if not vals:
                continue
            v = sorted(vals)
            q = [v[0], quantile(v, 0.25), quantile(v, 0.5), quantile(v, 0.75), v[-1]]
            color = PALETTE[names.index(gname) % len(PALETTE)]
            x = ML + i * slot + slot * 0.1 + k * width
            cx = x + width / 2
            tip = (f"{esc(label)}: {esc(gname)}, {len(v)} rows; min {fmt(q[0])}, median {fmt(q[2])}, "
                   f"max {fmt(q[4])}")
            body.append(f'<g><title>{tip}</title>'
                        f'<line x1="{cx:.1f}" x2="{cx:.1f}" y1="{frame.py(q[4]):.1f}" y2="{frame.py(q[0]):.1f}" '
                        f'stroke="{color}"/>'
                        f'<rect x="{x + width * 0.1:.1f}" y="{frame.py(q[3]):.1f}" width="{width * 0.8:.1f}" '
                        f'height="{max(frame.py(q[1]) - frame.py(q[3]), 1):.1f}" fill="{color}" fill-opacity="0.6" '
                        f'stroke="{color}"/>'
                        f'<line x1="{x + width * 0.1:.1f}" x2="{x + width * 0.9:.1f}" y1="{frame.py(q[2]):.1f}" '
                        f'y2="{frame.py(q[2]):.1f}" stroke="#222" stroke-width="2"/></g>')
            count += 1
        body.append(f'<text x="{ML + (i + 0.5) * slot:.1f}" y="{H - MB + 16}" class="tick" text-anchor="middle">'
                    f'{esc(label)}</text>')
    return _svg(name, count, "".join(body), title or ylabel) + _legend(names)
