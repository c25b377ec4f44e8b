"""The report of a reorder run (``dynamic_reorder``): the order rows were consumed in."""

from __future__ import annotations

import statistics
from collections import Counter
from collections.abc import Sequence
from typing import Any

from ..page import decided_at, group_counts, section, table
from ..reader import Damage
from ..rows import Rows, source_of, text_cells
from ..svg import band_chart, esc, fmt, line_chart, quantile, stacked_bars

ROW_TEXT = True
GROUP_BY = True
BLOCKS = 24  # --group-by: the run's steps cut into at most this many blocks of consecutive steps


def summary(run: dict[str, Any], lines_in: list[dict[str, Any]], top: int, damaged: Sequence[Damage] = ()) -> list[str]:
    """The orderings, and per step the scores of the rows consumed."""
    sched = run["schedule"]
    lines = [f"  {sched['total_steps']} steps; warm-up {sched['warmup_step']} steps in random order; "
             f"ordering(s) at step(s) {sched['updates']}; {len(lines_in)} step(s) recorded"]
    if not lines_in:
        return lines
    epochs = sorted({ln["epoch"] for ln in lines_in if ln.get("epoch") is not None})
    seen: Counter[int] = Counter()
    for ln in lines_in:
        seen.update(ln["indices"])
    paced = any(ln.get("competence") is not None for ln in lines_in)
    lines.append(f"  {len(seen)} of {run['train_size']} rows consumed, {sum(seen.values())} row-steps"
                 + (" (paced draws after the warm-up)" if paced else f", epochs {epochs[0]}-{epochs[-1]}"))
    lines.append(f"  {'step':>6} {'epoch':>5} {'scored':>6} {'mean score':>10} {'min':>10} {'max':>10}"
                 + ("  competence" if paced else ""))
    shown = lines_in if len(lines_in) <= 20 else lines_in[:10] + lines_in[-10:]
    for k, ln in enumerate(shown):
        if len(lines_in) > 20 and k == 10:
            lines.append("  ...")
        s = [v for v in ln.get("scores") or [] if v is not None]
        stats = (f"{statistics.fmean(s):>10.4f} {min(s):>10.4f} {max(s):>10.4f}" if s else f"{'-':>10} {'-':>10} {'-':>10}")
        comp = f"  {ln['competence']:.3f} ({ln.get('available')} rows)" if ln.get("competence") is not None else ""
        epoch = "-" if ln.get("epoch") is None else str(ln["epoch"])
        lines.append(f"  {ln['step']:>6} {epoch:>5} {len(s):>6} {stats}{comp}")
    return lines


def decision_steps(run: dict[str, Any], records: list[dict[str, Any]]) -> tuple[list[float], str]:
    """The steps an ordering was made at (the schedule's updates)."""
    return decided_at((run.get("schedule") or {}).get("updates") or [])


def export_refusal(run: dict[str, Any]) -> str | None:
    return ("cannot export: a reorder run trains on every row, only in another order (the order of "
            "consumption is in order.jsonl)")


def sections(run: dict[str, Any], lines: list[dict[str, Any]], rows: Rows | None, group_by: str | None,
             top: int) -> list[str]:
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
    out = [section("order", "Order of consumption", chart, note)]
    paced = [(float(ln["step"]), float(ln["competence"])) for ln in lines if ln.get("competence") is not None]
    if paced:
        out.append(section("pacing", "Curriculum pacing",
                            line_chart("pacing", [("competence c(t)", paced)], "optimizer step", "share of rows available",
                                       title="share of the ordered rows a step draws from"),
                            "each paced step draws its rows uniformly from the easiest share c(t)"))
    if group_by and rows is not None and lines:
        out.append(_composition(lines, rows, group_by))
    parts = (run.get("data_sources") or {}).get("parts")
    first: list[tuple[int, int, float | None]] = []
    for ln in lines:
        for i, sc in zip(ln.get("indices") or [], ln.get("scores") or []):
            first.append((ln["step"], i, sc))
    if first:
        headers = ["step", "row", "dataset", score, "instruction", "response"]
        ends = first[:top] + first[-top:] if len(first) > 2 * top else first
        body = [[esc(st), esc(i), esc(source_of(i, parts)), esc("-" if sc is None else fmt(sc))]
                + (text_cells(rows, i) if rows is not None else ["", ""]) for st, i, sc in ends]
        out.append(section("consumed", "First and last rows consumed", table(headers, body),
                            f"the first and last {min(top, len(first))} of {len(first)} row-steps"))
    return out


def blocks(lines: list[dict[str, Any]], most: int = BLOCKS) -> list[list[dict[str, Any]]]:
    """The recorded steps in order, cut into at most ``most`` blocks of equally many consecutive steps (the last
    may be shorter)."""
    ordered = sorted(lines, key=lambda ln: ln["step"])
    size = max(1, -(-len(ordered) // most))
    return [ordered[k:k + size] for k in range(0, len(ordered), size)]


def _composition(lines: list[dict[str, Any]], rows: Rows, column: str) -> str:
    """The rows consumed by a column's value, per block of steps: an order that groups the rows by that column
    (a loss order on a labelled set groups them by label) shows as blocks of one or two colours."""
    parts = blocks(lines)
    names, counts = group_counts([[rows.value(i, column) for ln in block for i in ln.get("indices") or []]
                                  for block in parts])
    labels = [f"{b[0]['step']}" if len(b) == 1 else f"{b[0]['step']}-{b[-1]['step']}" for b in parts]
    chart = stacked_bars("composition-group", labels, names, counts, "optimizer steps",
                         title=f"rows consumed by {column}, per block of steps")
    size = len(parts[0])
    note = (f"{len(lines)} recorded steps in {len(parts)} block(s) of {size} step(s); plain training's shuffled "
            f"order gives every block about the same mix")
    return section("composition", f"Rows consumed by {column}", chart, note)


def plot(plt: Any, run: dict[str, Any], lines: list[dict[str, Any]]) -> Any:
    """The score of the rows consumed per step (median and spread), and the pacing share if any."""
    import numpy as np

    fig, ax = plt.subplots(figsize=(8, 4))
    pts = [(ln["step"], [s for s in ln.get("scores") or [] if s is not None]) for ln in lines]
    pts = [(step, s) for step, s in pts if s]
    if pts:
        steps = [p[0] for p in pts]
        vals = [np.asarray(p[1], dtype=float) for p in pts]
        ax.fill_between(steps, [v.min() for v in vals], [v.max() for v in vals], color="#4c72b0", alpha=0.2,
                        linewidth=0, label="min-max of the step's rows")
        ax.plot(steps, [float(np.median(v)) for v in vals], color="#1f3b73", label="median")
        ax.legend(loc="upper left")
    else:
        ax.text(0.5, 0.5, "no scored rows consumed", ha="center", va="center", transform=ax.transAxes)
    paced = [(ln["step"], ln["competence"]) for ln in lines if ln.get("competence") is not None]
    if paced:
        ax2 = ax.twinx()
        ax2.plot([p[0] for p in paced], [p[1] for p in paced], color="#dd8452", linestyle="--", label="competence c(t)")
        ax2.set_ylim(0, 1.05)
        ax2.set_ylabel("share of rows available")
        ax2.legend(loc="lower right")
    for step in (run.get("schedule") or {}).get("updates") or []:
        ax.axvline(step, color="grey", linewidth=0.6, linestyle=":")
    score = (run.get("params") or {}).get("score", "score")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(f"{score} of the rows consumed")
    ax.set_title(f"{run['name']}: order of consumption")
    return fig
