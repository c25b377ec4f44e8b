"""The HTML page every mode shares: header, training loss, comparison with another run, and the kit
the per-mode report modules build their sections with (sections, tables, groups, extremes).

``dataflex-cli report OUTPUT_DIR --html FILE`` writes one self-contained page about a finished run.
It reads only what the run left on disk (the manifest and records through :mod:`.reader`,
``trainer_log.jsonl``, ``train_results.json`` and, for row text, the run's local dataset files) and
draws every chart as inline SVG (:mod:`.svg`): the page needs no server, network or script library.
Dataset text is untrusted and always escaped. Sections carry stable ids (``<section id="loss">``)
and charts ``<svg class="chart" data-points="N">`` so tests can check them in a browser. What a
mode shows comes from its report module (the mode table's ``report``); nothing here names a mode.
"""

from __future__ import annotations

import html
import json
import os
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..core.records import atomic_write_text
from ..errors import ConfigError
from .reader import RunFolder, grouping_modes, mode_report, read_run
from .rows import Rows, source_of
from .svg import MAX_GROUPS, esc, line_chart, stacked_bars


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


# ------------------------------------------------------------------------------------------ page parts
def section(sid: str, title: str, body: str, note: str = "") -> str:
    note_html = f'<p class="note">{esc(note)}</p>' if note else ""
    return f'<section id="{esc(sid)}"><h2>{esc(title)}</h2>{note_html}{body}</section>'


def table(headers: list[str], rows: list[list[str]], cls: str = "") -> str:
    """``rows`` hold already escaped cells."""
    head = "".join(f"<th>{esc(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'

def _header(found: RunFolder, results: dict[str, Any] | None) -> str:
    run = found.manifest
    params = {k: v for k, v in (run.get("params") or {}).items() if v is not None}
    sched = run.get("schedule") or {}
    parts = (run.get("data_sources") or {}).get("parts")
    versions = run.get("versions")
    rows = [
        ("mode", f"{found.mode} ({run.get('train_type')})"),
        ("component", f"{run.get('component')} (name: {run.get('name')})"),
        ("parameters", ", ".join(f"{k}={v}" for k, v in params.items()) or "defaults"),
        ("schedule", ", ".join(f"{k} {v if not isinstance(v, list) or len(v) <= 16 else str(v[:16])[:-1] + ', ...]'}"
                               for k, v in sched.items())),
        ("run id", run.get("run_id")),
        ("output dir", found.shown_output_dir),
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
    if found.damaged:
        rows.append(("damaged records", "; ".join(str(d) for d in found.damaged) + " (not counted)"))
    for note in found.notes:
        rows.append(("not found", note))
    cells = "".join(f"<tr><th>{esc(k)}</th><td>{esc(v)}</td></tr>" for k, v in rows)
    return (f'<section id="header"><h1>DataFlex run {esc(run.get("run_id"))}</h1>'
            f'<table class="kv">{cells}</table></section>')


def _loss_section(output_dir: Path, run: dict[str, Any], records: list[dict[str, Any]], kit: Any) -> str:
    loss, evals = training_log(output_dir)
    if not loss and not evals:
        return section("loss", "Training loss", "", "no trainer_log.jsonl with losses in the output dir")
    series = [("train loss", [(float(s), v) for s, v in loss])]
    if evals:
        series.append(("eval loss", [(float(s), v) for s, v in evals]))
    marks, note = kit.decision_steps(run, records)
    chart = line_chart("loss", series, "optimizer step", "loss", marks=marks, title="training loss over steps")
    return section("loss", "Training loss", chart, note)


def decided_at(steps: Sequence[float]) -> tuple[list[float], str]:
    """The loss chart's marks for a mode whose component decides at ``steps``, and their note."""
    steps = list(steps)
    return steps, "vertical lines: steps at which the component decided" if steps else ""


def pick_counts(records: list[dict[str, Any]]) -> Counter[int]:
    counts: Counter[int] = Counter()
    for rec in records:
        counts.update(rec.get("indices") or [])
    return counts


def group_counts(labels_per_bar: list[list[str]], order: Sequence[str] = ()) -> tuple[list[str], list[list[float]]]:
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


def extremes(sid: str, title: str, ends: tuple[str, str], headers: list[str], ranked: list[int], line,
              top: int, rows: Rows, note: str) -> str:
    """A section with the first and the last ``top`` of ``ranked`` as tables (``line(i)``: a row's cells)."""
    n = min(top, len(ranked))
    body = (f"<h3>{ends[0]} {n}</h3>" + table(headers, [line(i) for i in ranked[:top]], "rows") +
            f"<h3>{ends[1]} {n}</h3>" + table(headers, [line(i) for i in ranked[::-1][:top]], "rows"))
    if not rows.ok:
        note += f"; row text not shown: {rows.reason}"
    return section(sid, title, body, note)


# ------------------------------------------------------------------------------------------ compare
def trained_rows(records: list[dict[str, Any]]) -> Counter[int]:
    """How often each training row was trained on by decision: the rows of every record (a selection's
    picks; a lines file's rows of the step, every row for weight and reorder runs)."""
    return pick_counts(records)


def overlap(a: Counter[int], b: Counter[int]) -> dict[str, Any]:
    """Distinct rows in both runs, in one only, and their Jaccard index."""
    sa, sb = set(a), set(b)
    both = len(sa & sb)
    union = len(sa | sb)
    return {"both": both, "only_a": len(sa - sb), "only_b": len(sb - sa), "jaccard": both / union if union else 0.0}


def _compare_section(output_dir: Path, run: dict[str, Any], records: list[dict[str, Any]], other_dir: Path, shown: Path,
                     other: dict[str, Any], other_records: list[dict[str, Any]]) -> str:
    la, lb = f"this run ({run.get('component')})", f"other run ({other.get('component')})"
    loss_a, _ = training_log(output_dir)
    loss_b, _ = training_log(other_dir)
    chart = line_chart("compare-loss", [(la, [(float(s), v) for s, v in loss_a]),
                                        (lb, [(float(s), v) for s, v in loss_b])],
                       "optimizer step", "training loss", dashed=[False, True], title="training loss of both runs")
    a, b = trained_rows(records), trained_rows(other_records)
    names, counts = group_counts([
        [source_of(i, (run.get("data_sources") or {}).get("parts")) for i, c in a.items() for _ in range(c)],
        [source_of(i, (other.get("data_sources") or {}).get("parts")) for i, c in b.items() for _ in range(c)]],
        [p[0] for p in (run.get("data_sources") or {}).get("parts") or []])
    comp = stacked_bars("compare-composition", ["this run", "other run"], names, counts, "run",
                        title="rows trained on by dataset")
    ov = overlap(a, b)
    same = run.get("setup", {}).get("train_data") == other.get("setup", {}).get("train_data")
    overlap_table = table(["", "distinct rows"], [
        [esc("in both runs"), esc(ov["both"])], [esc("only in this run"), esc(ov["only_a"])],
        [esc("only in the other run"), esc(ov["only_b"])], [esc("Jaccard index"), esc(f"{ov['jaccard']:.3f}")]])
    note = (f"other run: {other.get('run_id')} in {shown}" +
            ("" if same else "; WARNING: the two runs trained on different data, so row indices do not match"))
    body = (f"<h3>training loss</h3>{chart}<h3>composition of the rows trained on</h3>{comp}"
            f'<h3>overlap of the rows</h3><div id="overlap" data-both="{ov["both"]}" data-only-a="{ov["only_a"]}" '
            f'data-only-b="{ov["only_b"]}">{overlap_table}</div>')
    return section("compare", "Comparison with another run", body, note)


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
    given = output_dir
    found = read_run(output_dir)
    output_dir = found.folder  # the output dir, also when the folder holding run.json was given
    run, records, mode = found.manifest, found.records, found.mode
    kit = mode_report(mode)
    results = _read_json(output_dir / "train_results.json")
    rows = Rows(run) if kit.ROW_TEXT else None
    if group_by:
        if not kit.GROUP_BY:
            raise ConfigError(f"--group-by: applies to {', '.join(grouping_modes())} runs; this is a {mode} run")
        if rows is None or not rows.ok:
            raise ConfigError(f"--group-by: cannot read the run's rows: {rows.reason}")
        if group_by not in rows.columns():
            raise ConfigError(f"--group-by: no column '{group_by}' in the run's datasets "
                              f"(columns: {', '.join(sorted(rows.columns()))})")
    other = None
    if compare is not None:
        try:
            other_found = read_run(compare)
        except ConfigError as err:
            raise ConfigError(f"--compare: {err}") from None
        other, other_records = other_found.manifest, other_found.records
        if not (other_found.folder / "train_results.json").is_file():
            raise ConfigError(f"--compare: '{Path(compare)}' has no train_results.json: that run has not finished")
    sections = [_header(found, results), _loss_section(output_dir, run, records, kit)]
    sections += kit.sections(run, records, rows, group_by, top)
    if other is not None:
        sections.append(_compare_section(output_dir, run, records, other_found.folder, Path(compare), other,
                                         other_records))
    nav = "".join(f'<a href="#{sid}">{esc(title)}</a>' for sid, title in _nav(sections))
    title = f"DataFlex {mode} run {run.get('run_id')} ({run.get('component')})"
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f'<title>{esc(title)}</title><style>{CSS}</style></head>'
            f'<body data-mode="{esc(mode)}"><nav>{nav}</nav><main>{"".join(sections)}'
            f'<footer>written by dataflex-cli report --html from {esc(given)}</footer></main>'
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
