"""``dataflex-cli report OUTPUT_DIR --html FILE``: one self-contained HTML page about a finished run.

Reads only what a run left on disk (the manifest and records via :mod:`dataflex.report`,
``trainer_log.jsonl``, ``train_results.json`` and, for row text, the run's local dataset files), and
draws every chart as inline SVG: the page needs no server, network or script library.
Dataset text is untrusted and always escaped. Sections carry stable ids (``<section id="loss">``)
and charts ``<svg class="chart" data-points="N">`` so tests can check them in a browser.
"""

from __future__ import annotations

import html
import json
import math
import os
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .core.records import atomic_write_text
from .errors import ConfigError
from .report import dataset_info, load_run, source_of, source_rows

MAX_POINTS = 400  # a drawn series keeps at most this many points
MAX_BARS = 120  # stacked bars (selections) drawn at most
MAX_GROUPS = 8  # categories of a composition chart; the rest is "other"
TEXT_CHARS = 160  # characters of a row's text shown in a table
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


def _fmt(x: float) -> str:
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
                         f'<text x="{ML - 6}" y="{y + 4:.1f}" class="tick" text-anchor="end">{_fmt(t)}</text>')
        if xticks:
            for t in _ticks(self.x0, self.x1, 8):
                x = self.px(t)
                parts.append(f'<text x="{x:.1f}" y="{H - MB + 16}" class="tick" text-anchor="middle">{_fmt(t)}</text>')
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
                    f'{_fmt(m)}</title></line>')
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
                        f'<title>{esc(label)}: step {_fmt(x)}, {_fmt(y)}</title></circle>' for x, y in pts)
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
            tip = (f"{esc(label)}: {esc(gname)}, {len(v)} rows; min {_fmt(q[0])}, median {_fmt(q[2])}, "
                   f"max {_fmt(q[4])}")
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


# ------------------------------------------------------------------------------------------ run data
def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def training_log(output_dir: Path) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
    """``(train loss, eval loss)`` points by step from LLaMA-Factory's ``trainer_log.jsonl`` (last value per step)."""
    loss: dict[int, float] = {}
    evals: dict[int, float] = {}
    path = output_dir / "trainer_log.jsonl"
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            step = entry.get("current_steps")
            if not isinstance(step, int):
                continue
            if isinstance(entry.get("loss"), (int, float)):
                loss[step] = float(entry["loss"])
            if isinstance(entry.get("eval_loss"), (int, float)):
                evals[step] = float(entry["eval_loss"])
    return sorted(loss.items()), sorted(evals.items())


class Rows:
    """Row text and columns of a run's training set, read back from its local dataset files.

    ``reason`` says why rows cannot be shown (then only indices are).
    """

    def __init__(self, run: dict[str, Any]):
        self.parts = ((run.get("data_sources") or {}).get("parts")) or []
        self.reason: str | None = None
        self._rows: dict[str, tuple[dict[str, Any], list[Any]]] = {}
        sources = run.get("data_sources")
        if not sources or not self.parts:
            self.reason = "the run did not record which dataset each row came from"
            return
        try:
            info = dataset_info(sources)
            for name, start, end in self.parts:
                attrs = dict(info.get(name) or {})
                rows = source_rows(sources, name, attrs)
                if len(rows) < end - start:
                    raise ConfigError(f"dataset '{name}' has {len(rows)} rows now, the run had {end - start}")
                self._rows[name] = (attrs, rows)
        except ConfigError as err:
            self.reason = str(err)
            self._rows = {}

    @property
    def ok(self) -> bool:
        return self.reason is None

    def row(self, index: int) -> tuple[dict[str, Any], Any] | None:
        for name, start, end in self.parts:
            if start <= index < end and name in self._rows:
                attrs, rows = self._rows[name]
                return attrs, rows[index - start]
        return None

    def columns(self) -> set[str]:
        cols: set[str] = set()
        for _, rows in self._rows.values():
            for r in rows[:200]:
                if isinstance(r, dict):
                    cols.update(r)
        return cols

    def value(self, index: int, column: str) -> str:
        found = self.row(index)
        if found is None or not isinstance(found[1], dict):
            return "?"
        value = found[1].get(column)
        return "(none)" if value is None else str(value)

    def text(self, index: int) -> tuple[str, str]:
        """``(prompt, response)`` of a row, each cut to TEXT_CHARS."""
        found = self.row(index)
        if found is None:
            return "", ""
        attrs, row = found
        prompt, response = row_text(row, attrs)
        return _cut(prompt), _cut(response)


def _cut(text: str) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= TEXT_CHARS else text[:TEXT_CHARS - 1] + "…"


def row_text(row: Any, attrs: dict[str, Any]) -> tuple[str, str]:
    """The instruction and response of a raw dataset row, using its dataset_info column mapping."""
    if not isinstance(row, dict):
        return str(row), ""
    cols = attrs.get("columns") or {}
    if attrs.get("formatting") == "sharegpt":
        tags = attrs.get("tags") or {}
        messages = row.get(cols.get("messages", "conversations")) or []
        role, content = tags.get("role_tag", "from"), tags.get("content_tag", "value")
        user = {tags.get("user_tag", "human"), "user", "human"}
        prompt = response = ""
        for msg in messages if isinstance(messages, list) else []:
            if not isinstance(msg, dict):
                continue
            if not prompt and msg.get(role) in user:
                prompt = str(msg.get(content, ""))
            elif prompt and not response:
                response = str(msg.get(content, ""))
        return prompt, response
    prompt = str(row.get(cols.get("prompt", "instruction")) or "")
    query = row.get(cols.get("query", "input"))
    if query:
        prompt = f"{prompt}\n{query}" if prompt else str(query)
    response = row.get(cols.get("response", "output"))
    if isinstance(response, list):
        response = response[0] if response else ""
    return prompt, "" if response is None else str(response)


# ------------------------------------------------------------------------------------------ page parts
def _section(sid: str, title: str, body: str, note: str = "") -> str:
    note_html = f'<p class="note">{esc(note)}</p>' if note else ""
    return f'<section id="{esc(sid)}"><h2>{esc(title)}</h2>{note_html}{body}</section>'


def _table(headers: list[str], rows: list[list[str]], cls: str = "") -> str:
    """``rows`` hold already escaped cells."""
    head = "".join(f"<th>{esc(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _decision_steps(run: dict[str, Any], records: list[dict[str, Any]]) -> list[int]:
    if run.get("mode") == "weight":
        return []
    if run.get("mode") == "reorder":
        return list((run.get("schedule") or {}).get("updates") or [])
    return [r["step"] for r in records if r.get("kind") in ("selection", "update") or "selection" in r]


def _header(run: dict[str, Any], results: dict[str, Any] | None) -> str:
    params = {k: v for k, v in (run.get("params") or {}).items() if v is not None}
    sched = run.get("schedule") or {}
    parts = (run.get("data_sources") or {}).get("parts")
    versions = run.get("versions")
    rows = [
        ("mode", f"{run.get('mode', 'select')} ({run.get('train_type')})"),
        ("component", f"{run.get('component')} (name: {run.get('name')})"),
        ("parameters", ", ".join(f"{k}={v}" for k, v in params.items()) or "defaults"),
        ("schedule", ", ".join(f"{k} {v if not isinstance(v, list) or len(v) <= 16 else str(v[:16])[:-1] + ', ...]'}"
                               for k, v in sched.items())),
        ("run id", run.get("run_id")),
        ("output dir", run.get("output_dir")),
        ("train set", f"{run.get('train_size')} rows" + (": " + ", ".join(f"{n} [{s}, {e})" for n, s, e in parts)
                                                        if parts else "")),
        ("model", run.get("model")),
        ("versions", ", ".join(f"{k} {v or '-'}" for k, v in versions.items()) if versions
         else "not recorded (a run from before versions were recorded)"),
    ]
    if results:
        runtime = results.get("train_runtime")
        secs = results.get("dataflex_seconds")
        share = results.get("dataflex_share")
        if share is None and secs is not None and runtime:
            share = secs / runtime
        wall = f"{runtime:.1f} s of training" if isinstance(runtime, (int, float)) else "-"
        if secs is not None:
            wall += f"; decisions {secs:.2f} s" + (f" ({100 * share:.1f}% of the run)" if share is not None else "")
        rows.append(("wall time", wall))
    else:
        rows.append(("wall time", "unknown: no train_results.json (the run has not finished)"))
    rows.append(("resumed from", f"{run['resumed_from']} (step {run.get('resumed_at')})" if run.get("resumed_from")
                 else "no (a fresh start)"))
    cells = "".join(f"<tr><th>{esc(k)}</th><td>{esc(v)}</td></tr>" for k, v in rows)
    return (f'<section id="header"><h1>DataFlex run {esc(run.get("run_id"))}</h1>'
            f'<table class="kv">{cells}</table></section>')


def _loss_section(output_dir: Path, run: dict[str, Any], records: list[dict[str, Any]]) -> str:
    loss, evals = training_log(output_dir)
    if not loss and not evals:
        return _section("loss", "Training loss", "", "no trainer_log.jsonl with losses in the output dir")
    series = [("train loss", [(float(s), v) for s, v in loss])]
    if evals:
        series.append(("eval loss", [(float(s), v) for s, v in evals]))
    marks = _decision_steps(run, records)
    note = "vertical lines: steps at which the component decided" if marks else ""
    warmup = (run.get("schedule") or {}).get("warmup_step")
    if run.get("mode") == "weight" and warmup:
        marks, note = [warmup], f"vertical line: end of the warm-up (step {warmup}); every later step is weighted"
    chart = line_chart("loss", series, "optimizer step", "loss", marks=marks, title="training loss over steps")
    return _section("loss", "Training loss", chart, note)


def _pick_counts(records: list[dict[str, Any]]) -> Counter[int]:
    counts: Counter[int] = Counter()
    for rec in records:
        counts.update(rec.get("indices") or [])
    return counts


def _pick_scores(rec: dict[str, Any]) -> tuple[str, list[tuple[int, float]]] | None:
    """(score name, [(index, score)]) of a selection's picks that have a score (random-share rows have none)."""
    for key, values in (rec.get("per_sample") or {}).items():
        if key == "random_share" or not values:
            continue
        if all(v is None or (isinstance(v, (int, float)) and not isinstance(v, bool)) for v in values) and \
                any(isinstance(v, float) for v in values):
            return key, [(i, float(v)) for i, v in zip(rec["indices"], values) if v is not None]
    return None


def _groups(labels_per_bar: list[list[str]], order: Sequence[str] = ()) -> tuple[list[str], list[list[float]]]:
    """Category names (``order`` first, then the most common; the tail folded into "other") and counts per bar."""
    total: Counter[str] = Counter()
    for labels in labels_per_bar:
        total.update(labels)
    names = [n for n in order if n in total] + [n for n, _ in total.most_common() if n not in order]
    if len(names) > MAX_GROUPS:
        names = names[:MAX_GROUPS - 1] + ["other"]
    index = {n: k for k, n in enumerate(names)}
    counts = []
    for labels in labels_per_bar:
        row = [0.0] * len(names)
        for lab in labels:
            row[index.get(lab, len(names) - 1)] += 1
        counts.append(row)
    return names, counts


def _text_cells(rows: Rows, i: int) -> list[str]:
    if not rows.ok:
        return ['<span class="muted">-</span>', '<span class="muted">-</span>']
    prompt, response = rows.text(i)
    return [f'<span class="text">{esc(prompt)}</span>', f'<span class="text">{esc(response)}</span>']


def _extremes(sid: str, title: str, ends: tuple[str, str], headers: list[str], ranked: list[int], line,
              top: int, rows: Rows, note: str) -> str:
    """A section with the first and the last ``top`` of ``ranked`` as tables (``line(i)``: a row's cells)."""
    n = min(top, len(ranked))
    body = (f"<h3>{ends[0]} {n}</h3>" + _table(headers, [line(i) for i in ranked[:top]], "rows") +
            f"<h3>{ends[1]} {n}</h3>" + _table(headers, [line(i) for i in ranked[::-1][:top]], "rows"))
    if not rows.ok:
        note += f"; row text not shown: {rows.reason}"
    return _section(sid, title, body, note)


def _select_sections(run: dict[str, Any], records: list[dict[str, Any]], rows: Rows, group_by: str | None,
                     top: int) -> list[str]:
    parts = (run.get("data_sources") or {}).get("parts")
    out = []
    # per selection: rows, unique, repeats
    table_rows = []
    for rec in records:
        idx = rec.get("indices") or []
        score = _pick_scores(rec)
        stat = "-"
        if score and score[1]:
            vals = [v for _, v in score[1]]
            stat = f"{score[0]}: mean {_fmt(sum(vals) / len(vals))}, min {_fmt(min(vals))}, max {_fmt(max(vals))}"
        table_rows.append([esc(rec.get("selection", 0) + 1), esc(rec["step"]), esc(len(idx)), esc(len(set(idx))),
                           esc(len(idx) - len(set(idx))), esc(f"{rec.get('seconds', 0):.2f}"), esc(stat)])
    shown = downsample(table_rows, 2 * top) if len(table_rows) > 2 * top else table_rows
    note = f"{len(records)} selections"
    if len(shown) < len(table_rows):
        note += f"; {len(shown)} shown, evenly spaced"
    out.append(_section("selections", "Selections", _table(
        ["#", "step", "rows", "unique", "repeats", "seconds", "score of the picks"], shown), note))
    # score distribution: picks against the scored pool
    labels, groups = [], []
    score_name = None
    has_pool = False
    for rec in records:
        score = _pick_scores(rec)
        pool = (rec.get("summary") or {}).get("pool_scores")
        pool_vals = [float(v) for v in (pool or {}).get("values", []) if isinstance(v, (int, float))]
        if not score and not pool_vals:
            continue
        score_name = score[0] if score else score_name
        group = []
        if pool_vals:
            has_pool = True
            group.append(("scored pool", pool_vals))
        group.append(("picks", [v for _, v in score[1]] if score else []))
        labels.append(str(rec["step"]))
        groups.append(group)
    if labels:
        chart = box_pairs("scores", labels, groups, "selection at step", score_name or "score",
                          title="score distribution per selection")
        note = ("boxes: quartiles and median, whiskers: min and max" +
                ("" if has_pool else "; the pool's scores were not recorded (record_scores: true records them)"))
        out.append(_section("scores", "Scores of the picks", chart, note))
    else:
        out.append(_section("scores", "Scores of the picks", "", "this selector records no per-row score"))
    # composition over selections
    comp = []
    if parts:
        names, counts = _groups([[source_of(i, parts) for i in rec.get("indices") or []] for rec in records],
                                [p[0] for p in parts])
        comp.append("<h3>by dataset</h3>" + stacked_bars("composition-dataset", [str(r["step"]) for r in records],
                                                         names, counts, "selection at step",
                                                         title="picks by dataset per selection"))
    if group_by:
        names, counts = _groups([[rows.value(i, group_by) for i in rec.get("indices") or []] for rec in records])
        comp.append(f"<h3>by {esc(group_by)}</h3>" + stacked_bars(
            "composition-group", [str(r["step"]) for r in records], names, counts, "selection at step",
            title=f"picks by {group_by} per selection"))
    out.append(_section("composition", "Composition of the picks", "".join(comp),
                        "" if comp else "the run did not record which dataset each row came from"))
    # top and bottom picks
    counts = _pick_counts(records)
    score_sum: Counter[int] = Counter()
    score_n: Counter[int] = Counter()
    for rec in records:
        score = _pick_scores(rec)
        for i, v in (score[1] if score else []):
            score_sum[i] += v
            score_n[i] += 1
    mean = {i: score_sum[i] / score_n[i] for i in score_n}
    if mean:
        ranked = sorted(mean, key=lambda i: (-mean[i], i))
        how = f"by mean {score_name} over the selections that took the row"
    else:
        ranked = sorted(counts, key=lambda i: (-counts[i], i))
        how = "by times chosen (no per-row score recorded)"
    headers = ["row", "dataset"] + ([group_by] if group_by else []) + ["times chosen", "score", "instruction",
                                                                       "response"]

    def line(i: int) -> list[str]:
        cells = [esc(i), esc(source_of(i, parts))]
        if group_by:
            cells.append(esc(rows.value(i, group_by)))
        cells += [esc(counts[i]), esc(_fmt(mean.get(i)))]
        return cells + _text_cells(rows, i)

    out.append(_extremes("picks", "Top and bottom picks", ("top", "bottom"), headers, ranked, line, top, rows,
                         f"{len(counts)} distinct rows picked, ranked {how}"))
    return out


def _per_domain(records: list[dict[str, Any]], domains: list[str], get) -> list[tuple[str, list[tuple[float, float]]]]:
    series = [(d, []) for d in domains]
    for rec in records:
        values = get(rec)
        if not values:
            continue
        for k, v in enumerate(values[:len(domains)]):
            if isinstance(v, (int, float)) and math.isfinite(v):
                series[k][1].append((float(rec["step"]), float(v)))
    return series


def _domain_loss(rec: dict[str, Any]) -> list[float | None] | None:
    stats = rec.get("statistics")
    if not stats:
        return None
    return [s / t if t else None for s, t in zip(stats.get("loss_sum", []), stats.get("tokens", []))]


def _mix_sections(run: dict[str, Any], records: list[dict[str, Any]]) -> list[str]:
    out = []
    if not records:
        return [_section("proportions", "Mixture proportions", "", "no mixing records")]
    domains = records[0]["domains"]
    end = (run.get("schedule") or {}).get("total_steps") or records[-1]["step"] + records[-1].get("num_steps", 1)
    chart = stacked_area("proportions", [float(r["step"]) for r in records], float(end), domains,
                         [r["proportions"] for r in records], "optimizer step", "proportion",
                         title="sampling proportions over steps")
    totals = [0] * len(domains)
    for rec in records:
        for k, c in enumerate(rec.get("counts") or []):
            totals[k] += c
    grand = sum(totals) or 1
    note = "rows drawn per domain over the run: " + ", ".join(
        f"{d} {n} ({100 * n / grand:.1f}%)" for d, n in zip(domains, totals))
    out.append(_section("proportions", "Mixture proportions", chart, note))
    extra = [("domain-loss", "Loss per domain", "token loss", "mean token loss per domain since the previous update",
              _domain_loss),
             ("loss-weights", "Loss weights", "loss weight", "weights of the domain losses in the training loss",
              lambda r: r.get("loss_weights")),
             ("excess-loss", "DoReMi excess loss", "excess loss", "loss above the reference model per domain",
              lambda r: (r.get("summary") or {}).get("excess_loss")),
             ("average-weights", "DoReMi averaged domain weights", "weight",
              "running average of DoReMi's domain weights (what step 3 trains with)",
              lambda r: (r.get("summary") or {}).get("average_domain_weights")),
             ("rewards", "ODM rewards", "reward", "the bandit's reward estimate per domain",
              lambda r: (r.get("summary") or {}).get("rewards"))]
    for sid, title, ylabel, note, get in extra:
        series = _per_domain(records, domains, get)
        if any(pts for _, pts in series):
            out.append(_section(sid, title, line_chart(sid, series, "optimizer step", ylabel, title=title), note))
    return out


def _weight_sections(run: dict[str, Any], lines: list[dict[str, Any]], rows: Rows, top: int) -> list[str]:
    if not lines:
        return [_section("weights", "Sample weights", "", "no weighted step recorded")]
    steps, bands = [], []
    total: Counter[int] = Counter()
    seen: Counter[int] = Counter()
    for ln in lines:
        w = sorted(float(x) for x in ln.get("weights") or [])
        if not w:
            continue
        steps.append(float(ln["step"]))
        bands.append((w[0], quantile(w, 0.1), quantile(w, 0.5), quantile(w, 0.9), w[-1]))
        for i, x in zip(ln.get("indices") or [], ln.get("weights") or []):
            total[i] += x
            seen[i] += 1
    chart = band_chart("weights", steps, bands, "optimizer step", "sample weight", ref=1.0,
                       title="distribution of the sample weights per step")
    out = [_section("weights", "Sample weights", chart,
                    f"{len(lines)} weighted steps; dotted line: weight 1 (the unweighted loss)")]
    mean = {i: total[i] / seen[i] for i in seen}
    ranked = sorted(mean, key=lambda i: (-mean[i], i))
    parts = (run.get("data_sources") or {}).get("parts")
    headers = ["row", "dataset", "mean weight", "weighted steps", "instruction", "response"]

    def line(i: int) -> list[str]:
        return [esc(i), esc(source_of(i, parts)), esc(_fmt(mean[i])), esc(seen[i])] + _text_cells(rows, i)

    out.append(_extremes("heavy", "Heaviest and lightest rows", ("heaviest", "lightest"), headers, ranked, line, top,
                         rows, f"{len(mean)} rows weighted, ranked by mean weight"))
    return out


def _reorder_sections(run: dict[str, Any], lines: list[dict[str, Any]], rows: Rows | None, top: int) -> list[str]:
    """The order of consumption: the scores of each step's rows, the pacing share, the first and last rows."""
    steps, bands = [], []
    for ln in lines:
        v = sorted(float(x) for x in ln.get("scores") or [] if x is not None)
        if v:
            steps.append(float(ln["step"]))
            bands.append((v[0], quantile(v, 0.1), quantile(v, 0.5), quantile(v, 0.9), v[-1]))
    score = (run.get("params") or {}).get("score", "score")
    if steps:
        chart = band_chart("order", steps, bands, "optimizer step", f"{score} of the step's rows",
                           title="scores of the rows consumed per step")
        note = f"{len(lines)} steps recorded; warm-up steps (random order, not yet scored) have no band"
    else:
        chart, note = "", "no scored row consumed yet"
    out = [_section("order", "Order of consumption", chart, note)]
    paced = [(float(ln["step"]), float(ln["competence"])) for ln in lines if ln.get("competence") is not None]
    if paced:
        out.append(_section("pacing", "Curriculum pacing",
                            line_chart("pacing", [("competence c(t)", paced)], "optimizer step", "share of rows available",
                                       title="share of the ordered rows a step draws from"),
                            "each paced step draws its rows uniformly from the easiest share c(t)"))
    parts = (run.get("data_sources") or {}).get("parts")
    first: list[tuple[int, int, float | None]] = []
    for ln in lines:
        for i, sc in zip(ln.get("indices") or [], ln.get("scores") or []):
            first.append((ln["step"], i, sc))
    if first:
        headers = ["step", "row", "dataset", score, "instruction", "response"]
        ends = first[:top] + first[-top:] if len(first) > 2 * top else first
        body = [[esc(st), esc(i), esc(source_of(i, parts)), esc("-" if sc is None else _fmt(sc))]
                + (_text_cells(rows, i) if rows is not None else ["", ""]) for st, i, sc in ends]
        out.append(_section("consumed", "First and last rows consumed", _table(headers, body),
                            f"the first and last {min(top, len(first))} of {len(first)} row-steps"))
    return out


# ------------------------------------------------------------------------------------------ compare
def trained_rows(run: dict[str, Any], records: list[dict[str, Any]]) -> Counter[int]:
    """How often each training row was trained on by decision (select / mix: the records' rows; weight: all)."""
    from .modes import BY_NAME

    mode = BY_NAME.get(run.get("mode", "select"))
    if mode is not None and mode.lines:  # per-step lines of every row trained on (weight, reorder)
        counts: Counter[int] = Counter()
        for ln in records:
            counts.update(ln.get("indices") or [])
        return counts
    return _pick_counts(records)


def overlap(a: Counter[int], b: Counter[int]) -> dict[str, Any]:
    """Distinct rows in both runs, in one only, and their Jaccard index."""
    sa, sb = set(a), set(b)
    both = len(sa & sb)
    union = len(sa | sb)
    return {"both": both, "only_a": len(sa - sb), "only_b": len(sb - sa), "jaccard": both / union if union else 0.0}


def _compare_section(output_dir: Path, run: dict[str, Any], records: list[dict[str, Any]], other_dir: Path,
                     other: dict[str, Any], other_records: list[dict[str, Any]]) -> str:
    la, lb = f"this run ({run.get('component')})", f"other run ({other.get('component')})"
    loss_a, _ = training_log(output_dir)
    loss_b, _ = training_log(other_dir)
    chart = line_chart("compare-loss", [(la, [(float(s), v) for s, v in loss_a]),
                                        (lb, [(float(s), v) for s, v in loss_b])],
                       "optimizer step", "training loss", dashed=[False, True], title="training loss of both runs")
    a, b = trained_rows(run, records), trained_rows(other, other_records)
    names, counts = _groups([
        [source_of(i, (run.get("data_sources") or {}).get("parts")) for i, c in a.items() for _ in range(c)],
        [source_of(i, (other.get("data_sources") or {}).get("parts")) for i, c in b.items() for _ in range(c)]],
        [p[0] for p in (run.get("data_sources") or {}).get("parts") or []])
    comp = stacked_bars("compare-composition", ["this run", "other run"], names, counts, "run",
                        title="rows trained on by dataset")
    ov = overlap(a, b)
    same = run.get("setup", {}).get("train_data") == other.get("setup", {}).get("train_data")
    table = _table(["", "distinct rows"], [
        [esc("in both runs"), esc(ov["both"])], [esc("only in this run"), esc(ov["only_a"])],
        [esc("only in the other run"), esc(ov["only_b"])], [esc("Jaccard index"), esc(f"{ov['jaccard']:.3f}")]])
    note = (f"other run: {other.get('run_id')} in {other_dir}" +
            ("" if same else "; WARNING: the two runs trained on different data, so row indices do not match"))
    body = (f"<h3>training loss</h3>{chart}<h3>composition of the rows trained on</h3>{comp}"
            f'<h3>overlap of the rows</h3><div id="overlap" data-both="{ov["both"]}" data-only-a="{ov["only_a"]}" '
            f'data-only-b="{ov["only_b"]}">{table}</div>')
    return _section("compare", "Comparison with another run", body, note)


# ------------------------------------------------------------------------------------------ the page
CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:#1d2330;background:#f4f5f7;margin:0}
main{max-width:900px;margin:0 auto;padding:16px 20px 40px}
nav{position:sticky;top:0;background:#1f3b73;padding:8px 20px;z-index:1}
nav a{color:#fff;margin-right:14px;text-decoration:none;font-size:13px}
section{background:#fff;border:1px solid #dde1e8;border-radius:6px;padding:12px 18px;margin:14px 0}
h1{font-size:20px;margin:4px 0 10px}h2{font-size:17px;margin:2px 0 6px}h3{font-size:14px;margin:12px 0 4px;color:#444}
.note{color:#5b6473;margin:0 0 6px;font-size:13px}
table{border-collapse:collapse;width:100%;font-size:12.5px}
th,td{border-bottom:1px solid #e6e8ec;padding:3px 6px;text-align:left;vertical-align:top}
thead th{background:#f0f2f5}
table.kv th{width:130px;color:#5b6473;font-weight:600}
td .text{display:block;max-width:300px;white-space:pre-wrap;word-break:break-word}
.muted{color:#999}
svg.chart{width:100%;height:auto;display:block}
svg .grid{stroke:#eceef2}svg .axis{stroke:#888}svg .mark{stroke:#c44e52;stroke-opacity:.45;stroke-dasharray:3 3}
svg .ref{stroke:#555;stroke-dasharray:2 3}
svg .tick{font-size:11px;fill:#555}svg .label{font-size:12px;fill:#333}
.legend{font-size:12px;color:#333;margin:2px 0 6px 60px}
.key{margin-right:14px;white-space:nowrap}
.key i{display:inline-block;width:18px;border-top:3px solid;vertical-align:middle;margin-right:5px}
.key i.box{height:10px;border:0}
.key i.markkey{border-top:2px dashed #c44e52}
footer{color:#777;font-size:12px;text-align:center}
"""

# Marks every chart with the size the browser laid it out at, so a test can tell a drawn page from a blank one.
SCRIPT = """
document.querySelectorAll('svg.chart').forEach(function (svg) {
  var box = svg.getBoundingClientRect();
  svg.setAttribute('data-rendered', Math.round(box.width) + 'x' + Math.round(box.height));
});
document.body.setAttribute('data-ready', '1');
"""


def build_page(output_dir: str | os.PathLike, group_by: str | None = None, compare: str | os.PathLike | None = None,
               top: int = 10) -> str:
    """The HTML page of a run (and a comparison with ``compare``); ConfigError naming the flag on bad input."""
    output_dir = Path(output_dir)
    run, records = load_run(output_dir)
    mode = run.get("mode", "select")
    results = _read_json(output_dir / "train_results.json")
    rows = Rows(run) if mode in ("select", "weight", "reorder") else None
    if group_by:
        if mode != "select":
            raise ConfigError(f"--group-by: applies to selection runs; this is a {mode} run")
        if rows is None or not rows.ok:
            raise ConfigError(f"--group-by: cannot read the run's rows: {rows.reason}")
        if group_by not in rows.columns():
            raise ConfigError(f"--group-by: no column '{group_by}' in the run's datasets "
                              f"(columns: {', '.join(sorted(rows.columns()))})")
    other = None
    if compare is not None:
        other_dir = Path(compare)
        try:
            other, other_records = load_run(other_dir)
        except ConfigError as err:
            raise ConfigError(f"--compare: {err}") from None
        if not (other_dir / "train_results.json").is_file():
            raise ConfigError(f"--compare: '{other_dir}' has no train_results.json: that run has not finished")
    sections = [_header(run, results), _loss_section(output_dir, run, records)]
    if mode == "select":
        sections += _select_sections(run, records, rows, group_by, top)
    elif mode == "mix":
        sections += _mix_sections(run, records)
    elif mode == "weight":
        sections += _weight_sections(run, records, rows, top)
    elif mode == "reorder":
        sections += _reorder_sections(run, records, rows, top)
    if other is not None:
        sections.append(_compare_section(output_dir, run, records, other_dir, other, other_records))
    nav = "".join(f'<a href="#{sid}">{esc(title)}</a>' for sid, title in _nav(sections))
    title = f"DataFlex {mode} run {run.get('run_id')} ({run.get('component')})"
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f'<title>{esc(title)}</title><style>{CSS}</style></head>'
            f'<body data-mode="{esc(mode)}"><nav>{nav}</nav><main>{"".join(sections)}'
            f'<footer>written by dataflex-cli report --html from {esc(output_dir)}</footer></main>'
            f'<script>{SCRIPT}</script></body></html>\n')


def _nav(sections: list[str]) -> list[tuple[str, str]]:
    out = []
    for s in sections:
        sid = s.split('id="', 1)[1].split('"', 1)[0]
        if sid == "header":
            continue
        title = s.split("<h2>", 1)[1].split("</h2>", 1)[0] if "<h2>" in s else sid
        out.append((sid, html.unescape(title)))
    return out


def write_page(output_dir: str | os.PathLike, target: str | os.PathLike, **kwargs: Any) -> Path:
    """Build the page and write it to ``target`` through a temp file: never a half-written page."""
    page = build_page(output_dir, **kwargs)
    target = Path(target)
    if not target.parent.is_dir():
        raise ConfigError(f"--html: folder '{target.parent}' does not exist")
    try:
        atomic_write_text(target, page, shared=True)
    except OSError as err:
        raise ConfigError(f"--html: cannot write '{target}': {err.strerror or err}") from None
    return target
