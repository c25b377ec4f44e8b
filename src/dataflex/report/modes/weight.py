"""The report of a weighting run (``dynamic_weight``): the sample weights of every step."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

from ...values import NEAR_UNIFORM_WEIGHTS
from ..page import extremes, section
from ..reader import Damage
from ..rows import Rows, source_of, text_cells
from ..svg import band_chart, esc, fmt, quantile

ROW_TEXT = True
GROUP_BY = False


def summary(run: dict[str, Any], lines_in: list[dict[str, Any]], top: int, damaged: Sequence[Damage] = ()) -> list[str]:
    """The spread of the weights per step and the rows weighted most and least."""
    sched = run["schedule"]
    lines = [f"  warm-up {sched['warmup_step']} steps with weights 1; {len(lines_in)} weighted step(s) recorded"]
    if not lines_in:
        return lines
    import statistics

    ess = [ln["ess"] for ln in lines_in]
    stds = [ln["std"] for ln in lines_in]
    lines.append(f"  weight std per step: mean {statistics.fmean(stds):.4f}, max {max(stds):.4f}; effective sample "
                 f"size per step: mean {statistics.fmean(ess):.2f}, min {min(ess):.2f}")
    mins = [ln["min"] for ln in lines_in]
    maxs = [ln["max"] for ln in lines_in]
    lines.append(f"  weights ranged from {min(mins):.4f} to {max(maxs):.4f}")
    if max(maxs) - min(mins) < NEAR_UNIFORM_WEIGHTS:
        lines.append("  note: the weights hardly moved from 1: this run weighted the loss almost as plain training "
                     "does; expect plain training's result")
    total: Counter[int] = Counter()
    seen: Counter[int] = Counter()
    for ln in lines_in:
        for i, w in zip(ln["indices"], ln["weights"]):
            total[i] += w
            seen[i] += 1
    mean = {i: total[i] / seen[i] for i in seen}
    ranked = sorted(mean, key=lambda i: (-mean[i], i))
    lines.append("  highest mean weight: " + ", ".join(f"{i} ({mean[i]:.3f})" for i in ranked[:top]))
    lines.append("  lowest mean weight: " + ", ".join(f"{i} ({mean[i]:.3f})" for i in ranked[::-1][:top]))
    parts = (run.get("data_sources") or {}).get("parts")
    if parts:
        by: dict[str, list[float]] = {}
        for i, m in mean.items():
            by.setdefault(source_of(i, parts), []).append(m)
        lines.append("  mean weight by dataset: " + ", ".join(
            f"{name} {statistics.fmean(by[name]):.3f}" for name, _, _ in parts if name in by))
    return lines


def decision_steps(run: dict[str, Any], records: list[dict[str, Any]]) -> tuple[list[float], str]:
    """Every step after the warm-up is weighted: the chart marks the end of the warm-up only."""
    warmup = (run.get("schedule") or {}).get("warmup_step")
    if not warmup:
        return [], ""
    return [warmup], f"vertical line: end of the warm-up (step {warmup}); every later step is weighted"


def export_refusal(run: dict[str, Any]) -> str | None:
    return "cannot export: a weighting run trains on every row (export the weights from weights.jsonl)"


def sections(run: dict[str, Any], lines: list[dict[str, Any]], rows: Rows, group_by: str | None,
             top: int) -> list[str]:
    """The weights per step as bands, and the heaviest and lightest rows."""
    if not lines:
        return [section("weights", "Sample weights", "", "no weighted step recorded")]
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
    out = [section("weights", "Sample weights", chart,
                    f"{len(lines)} weighted steps; dotted line: weight 1 (the unweighted loss)")]
    mean = {i: total[i] / seen[i] for i in seen}
    ranked = sorted(mean, key=lambda i: (-mean[i], i))
    parts = (run.get("data_sources") or {}).get("parts")
    headers = ["row", "dataset", "mean weight", "weighted steps", "instruction", "response"]

    def line(i: int) -> list[str]:
        return [esc(i), esc(source_of(i, parts)), esc(fmt(mean[i])), esc(seen[i])] + text_cells(rows, i)

    out.append(extremes("heavy", "Heaviest and lightest rows", ("heaviest", "lightest"), headers, ranked, line, top,
                         rows, f"{len(mean)} rows weighted, ranked by mean weight"))
    return out


def plot(plt: Any, run: dict[str, Any], lines: list[dict[str, Any]]) -> Any:
    """The spread of the weights per step (percentile bands and the median)."""
    import numpy as np

    fig, ax = plt.subplots(figsize=(8, 4))
    if lines:
        steps = [ln["step"] for ln in lines]
        w = [np.asarray(ln["weights"]) for ln in lines]
        for lo, hi, alpha in ((0, 100, 0.15), (10, 90, 0.3), (25, 75, 0.5)):
            ax.fill_between(steps, [np.percentile(x, lo) for x in w], [np.percentile(x, hi) for x in w],
                            color="#4c72b0", alpha=alpha, linewidth=0, label=f"{lo}-{hi}th percentile")
        ax.plot(steps, [np.median(x) for x in w], color="#1f3b73", label="median")
        ax.axhline(1.0, color="grey", linewidth=0.8, linestyle=":")
        ax.legend(loc="upper right")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("sample weight")
    ax.set_title(f"{run['name']}: weight distribution per step")
    return fig
