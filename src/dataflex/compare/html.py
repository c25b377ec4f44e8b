"""The ``--html`` page of a comparison: one self-contained file (inline CSS and SVG, no script), drawn
with the report package's chart kit and style; each run links to its own report page.
"""

from __future__ import annotations

import html
import os
import re
from pathlib import Path
from typing import Any

from ..report.page import CSS
from ..report.svg import line_chart
from .analysis import higher_is_better, render

def run_report(out: Path, target: Path) -> Path | None:
    """A run's own report page (what ``dataflex-cli report OUT --html`` writes), or None for a run without
    DataFlex records (``plain``). The one place this page reads a run folder."""
    from ..errors import ConfigError
    from ..report.page import write_page as report_page

    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        return report_page(out, target)
    except ConfigError:
        return None


def _curves(data: dict[str, Any], metric: str, x: str) -> list[tuple[str, list[tuple[float, float]]]]:
    """Per method (and the baseline's long runs), the metric at each checkpoint averaged over the seeds."""
    by: dict[str, dict[int, list[tuple[float, float]]]] = {}
    for entry in data["runs"]:
        name = entry["method"] + (" (long)" if entry.get("role") == "long" and "steps" in data["budgets"] else "")
        for p in entry["curve"]:
            if p.get(x) is None or metric not in p["values"]:
                continue
            by.setdefault(name, {}).setdefault(p["step"], []).append((p[x], p["values"][metric]))
    return [(name, [(sum(a for a, _ in v) / len(v), sum(b for _, b in v) / len(v)) for _, v in sorted(steps.items())])
            for name, steps in by.items()]


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
    better = "higher" if higher_is_better(tab["metric"]) else "lower"
    return (f"<h3>Budget {tab['budget']} ({what}), metric {tab['metric']} ({better} is better)</h3>"
            "<table><tr><th>method</th><th>seeds</th><th>mean ± 95% CI</th><th>difference to "
            f"{html.escape(tab['baseline'])} ± 95% CI</th><th>verdict</th></tr>{''.join(rows)}</table>"
            + (f"<ul>{notes}</ul>" if notes else ""))


def page(data: dict[str, Any], where: Path | None = None) -> str:
    order = ["loss", "choice", "choice_norm", "exact"]
    metrics = sorted({t["metric"] for t in data["tables"]},
                     key=lambda m: (":" in m, m.rpartition(":")[0], order.index(m.rpartition(":")[2])))
    charts = []
    for metric in metrics:
        ident = metric.replace(":", "-")
        charts.append(f"<h3>{html.escape(metric)}</h3>"
                      + line_chart(f"{ident}-by-step", _curves(data, metric, "step"), "optimizer step", metric)
                      + line_chart(f"{ident}-by-seconds", _curves(data, metric, "seconds"), "seconds of training",
                                   metric))
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
<style>{CSS}
td.better{{color:#1a7f37;font-weight:bold}}td.worse{{color:#c62828;font-weight:bold}}
pre{{background:#f6f6f6;padding:.5em;overflow-x:auto}}</style></head><body><main>
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
</main></body></html>
"""


def write_page(data: dict[str, Any], path: str | os.PathLike) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page(data, path), encoding="utf-8")
