"""The ``--html`` page of a comparison: one self-contained file (inline CSS and SVG, no script).

A small SVG line-chart helper lives here for now; the report package's chart kit can replace it.
"""

from __future__ import annotations

import html
import os
import re
from pathlib import Path
from typing import Any

from .analysis import HIGHER_IS_BETTER, render

COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf")


def line_chart(series: dict[str, list[tuple[float, float]]], xlabel: str, ylabel: str,
               width: int = 520, height: int = 300) -> str:
    """An inline SVG line chart: one polyline with markers per named series."""
    pts = [p for s in series.values() for p in s]
    if not pts:
        return "<p>(no points)</p>"
    x0, x1 = min(p[0] for p in pts), max(p[0] for p in pts)
    y0, y1 = min(p[1] for p in pts), max(p[1] for p in pts)
    if x1 == x0:
        x1 = x0 + 1
    if y1 == y0:
        y1 = y0 + 1e-6
    left, right, top, bottom = 60, 130, 15, 40
    w, h = width - left - right, height - top - bottom

    def sx(x: float) -> float:
        return left + (x - x0) / (x1 - x0) * w

    def sy(y: float) -> float:
        return top + (1 - (y - y0) / (y1 - y0)) * h

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
           f'aria-label="{html.escape(ylabel)} vs {html.escape(xlabel)}">',
           f'<rect x="{left}" y="{top}" width="{w}" height="{h}" fill="none" stroke="#999"/>']
    for i in range(5):
        yv = y0 + (y1 - y0) * i / 4
        xv = x0 + (x1 - x0) * i / 4
        out.append(f'<text x="{left - 4}" y="{sy(yv) + 4:.1f}" font-size="10" text-anchor="end">{yv:.4g}</text>')
        out.append(f'<text x="{sx(xv):.1f}" y="{top + h + 14}" font-size="10" text-anchor="middle">{xv:.4g}</text>')
    out.append(f'<text x="{left + w / 2}" y="{height - 6}" font-size="11" text-anchor="middle">{html.escape(xlabel)}</text>')
    out.append(f'<text x="12" y="{top + h / 2}" font-size="11" text-anchor="middle" '
               f'transform="rotate(-90 12 {top + h / 2})">{html.escape(ylabel)}</text>')
    for i, (name, s) in enumerate(series.items()):
        color = COLORS[i % len(COLORS)]
        path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in sorted(s))
        out.append(f'<polyline fill="none" stroke="{color}" stroke-width="2" points="{path}"/>')
        out += [f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="3" fill="{color}"/>' for x, y in s]
        out.append(f'<text x="{left + w + 8}" y="{top + 14 + 16 * i}" font-size="11" fill="{color}">'
                   f'{html.escape(name)}</text>')
    out.append("</svg>")
    return "\n".join(out)


def run_report(out: Path, target: Path) -> Path | None:
    """A run's own report page (what ``dataflex-cli report OUT --html`` writes), or None for a run without
    DataFlex records (``plain``). The one place this page reads a run folder."""
    from ..errors import ConfigError
    from ..report_html import write_page as report_page

    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        return report_page(out, target)
    except ConfigError:
        return None


def _curves(data: dict[str, Any], metric: str, x: str) -> dict[str, list[tuple[float, float]]]:
    """Per method (and the baseline's long runs), the metric at each checkpoint averaged over the seeds."""
    by: dict[str, dict[int, list[tuple[float, float]]]] = {}
    for entry in data["runs"]:
        name = entry["method"] + (" (long)" if entry.get("role") == "long" and "steps" in data["budgets"] else "")
        for p in entry["curve"]:
            if p.get(x) is None or metric not in p["values"]:
                continue
            by.setdefault(name, {}).setdefault(p["step"], []).append((p[x], p["values"][metric]))
    return {name: [(sum(a for a, _ in v) / len(v), sum(b for _, b in v) / len(v)) for _, v in sorted(steps.items())]
            for name, steps in by.items()}


def _table_html(tab: dict[str, Any]) -> str:
    rows = []
    for r in tab["rows"]:
        if not r.get("seeds"):
            rows.append(f"<tr><td>{html.escape(r['method'])}</td><td>0</td><td colspan=3>no finished run</td></tr>")
            continue
        est = f"{r['mean']:.4f}" + (f" ± {(r['hi'] - r['lo']) / 2:.4f}" if r["lo"] is not None else "")
        if "diff_mean" in r:
            diff = f"{r['diff_mean']:+.4f}" + (f" ± {(r['diff_hi'] - r['diff_lo']) / 2:.4f}" if r["diff_lo"] is not None else "")
        else:
            diff = "(baseline)"
        word = r.get("verdict") or ""
        rows.append(f"<tr><td>{html.escape(r['method'])}</td><td>{r['seeds']}</td><td>{est}</td><td>{diff}</td>"
                    f"<td class='{word}'>{word}</td></tr>")
    notes = "".join(f"<li>{html.escape(n)}</li>" for n in tab["notes"])
    what = "same optimizer steps" if tab["budget"] == "steps" else f"same compute ({tab['unit']})"
    better = "higher" if HIGHER_IS_BETTER[tab["metric"]] else "lower"
    return (f"<h3>Budget {tab['budget']} ({what}), metric {tab['metric']} ({better} is better)</h3>"
            "<table><tr><th>method</th><th>seeds</th><th>mean ± 95% CI</th><th>difference to "
            f"{html.escape(tab['baseline'])} ± 95% CI</th><th>verdict</th></tr>{''.join(rows)}</table>"
            + (f"<ul>{notes}</ul>" if notes else ""))


def page(data: dict[str, Any], where: Path | None = None) -> str:
    metrics = sorted({t["metric"] for t in data["tables"]}, key=["loss", "choice", "choice_norm", "exact"].index)
    charts = []
    for metric in metrics:
        charts.append(f"<h3>{metric}</h3><div class='charts'>"
                      + line_chart(_curves(data, metric, "step"), "optimizer step", metric)
                      + line_chart(_curves(data, metric, "seconds"), "seconds of training", metric) + "</div>")
    links = []
    for entry in data["runs"]:
        target = Path(entry["out"])
        if where is not None:
            stem = f"{entry['method']}-seed-{entry['seed_index']}{'-long' if entry.get('role') == 'long' else ''}"
            report = run_report(target, where.parent / f"{where.stem}_runs" / f"{re.sub(r'[^A-Za-z0-9_.=-]+', '_', stem)}.html")
            target = report if report is not None else target
            try:
                target = Path(os.path.relpath(target.resolve(), where.resolve().parent))
            except ValueError:
                pass
        suffix = "" if target.suffix == ".html" else "/"
        links.append(f"<li><a href='{html.escape(target.as_posix())}{suffix}'>{html.escape(entry['method'])} seed "
                     f"{entry['seed_index']}{' (long)' if entry.get('role') == 'long' else ''}</a>: seed {entry['seed']}, "
                     f"{entry['steps']} steps, {entry['seconds']['train'] or 0:.1f} s training "
                     f"({entry['seconds']['decisions'] or 0:.1f} s deciding)</li>")
    missing = "".join(f"<li>{html.escape(m)}</li>" for m in data["missing"])
    text = "\n\n".join(render(t) for t in data["tables"])
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>DataFlex compare: {html.escape(', '.join(data['methods']))}</title>
<style>body{{font-family:sans-serif;max-width:1150px;margin:1em auto}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:3px 8px;text-align:right}}td:first-child{{text-align:left}}
.better{{color:#1a7f37;font-weight:bold}}.worse{{color:#c62828;font-weight:bold}}.charts{{display:flex;flex-wrap:wrap;gap:1em}}
pre{{background:#f6f6f6;padding:.5em;overflow-x:auto}}</style></head><body>
<h1>DataFlex compare</h1>
<p>Config {html.escape(data['config'])}; methods {html.escape(', '.join(data['methods']))}; baseline
{html.escape(data['baseline'])}; {data['seeds']} seed(s); {data['steps']} steps per method (baseline
{data['baseline_steps']}); checkpoints every {data['eval_every']} steps; {data['eval_rows']} eval rows.
A verdict is read from the 95% interval of the difference only: <i>tie</i> means the interval holds 0, not that
the methods are equal.</p>
<h2>Tables</h2>{''.join(_table_html(t) for t in data['tables'])}
{f'<h2>Missing runs</h2><ul>{missing}</ul>' if missing else ''}
<h2>Curves (mean over seeds)</h2>{''.join(charts)}
<h2>Runs</h2><ul>{''.join(links)}</ul>
<h2>As text</h2><pre>{html.escape(text)}</pre>
</body></html>
"""


def write_page(data: dict[str, Any], path: str | os.PathLike) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page(data, path), encoding="utf-8")
