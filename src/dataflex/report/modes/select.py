"""The report of a selection run (``dynamic_select``): its selections, their scores and picks."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

from ...core.records import primary_score
from ..page import decided_at, extremes, group_counts, pick_counts, section, table
from ..reader import Damage
from ..rows import Rows, source_of, text_cells
from ..svg import box_pairs, downsample, esc, fmt, stacked_bars
from ..text import by_source

ROW_TEXT = True
GROUP_BY = True


def summary(run: dict[str, Any], records: list[dict[str, Any]], top: int, damaged: Sequence[Damage] = ()) -> list[str]:
    """The schedule, one line per selection, and what was picked across them."""
    sched = run["schedule"]
    lines = [f"  schedule: {sched['total_steps']} steps x {sched['global_batch']} samples, warm-up {sched['warmup_step']}, "
             f"{sched['update_times']} x {sched['update_step']} steps per cycle, selections at steps {sched['updates']}"]
    parts = (run.get("data_sources") or {}).get("parts")
    read = {r["step"] for r in records} | {d.step for d in damaged}
    missing = [s for s in sched["updates"] if s not in read]
    lines.append(f"\nSelections ({len(records)} recorded" + (f", missing steps {missing}" if missing else "") + "):")
    lines.append(f"  {'#':>3} {'step':>6} {'samples':>8} {'unique':>7} {'seconds':>8}  score (mean / min / max)")
    counts: Counter[int] = Counter()
    for rec in records:
        idx = rec["indices"]
        counts.update(idx)
        score = primary_score(rec)
        stat = "-"
        if score:
            key, vals = score
            stat = f"{key} {sum(vals) / len(vals):.4g} / {min(vals):.4g} / {max(vals):.4g}"
        lines.append(f"  {rec['selection'] + 1:>3} {rec['step']:>6} {len(idx):>8} {len(set(idx)):>7} "
                     f"{rec.get('seconds', 0):>8.2f}  {stat}")
    if records:
        total = sum(counts.values())
        lines.append(f"\nAcross selections: {len(counts)} distinct samples "
                     f"({100 * len(counts) / max(run['train_size'], 1):.1f}% of the train set), {total} picks")
        lines.append("  most chosen: " + ", ".join(f"{i} (x{c})" for i, c in counts.most_common(top)))
        if parts:
            lines.append("  picks by dataset: " + by_source(counts, parts, run["train_size"]))
    return lines


def decision_steps(run: dict[str, Any], records: list[dict[str, Any]]) -> tuple[list[float], str]:
    return decided_at([r["step"] for r in records if r.get("kind") in ("selection", "update") or "selection" in r])


def export_refusal(run: dict[str, Any]) -> str | None:
    return None  # the picks are rows of the training set: exportable


def pick_scores(rec: dict[str, Any]) -> tuple[str, list[tuple[int, float]]] | None:
    """(score name, [(index, score)]) of a selection's picks that have a score (random-share rows have none)."""
    for key, values in (rec.get("per_sample") or {}).items():
        if key == "random_share" or not values:
            continue
        if all(v is None or (isinstance(v, (int, float)) and not isinstance(v, bool)) for v in values) and \
                any(isinstance(v, float) for v in values):
            return key, [(i, float(v)) for i, v in zip(rec["indices"], values) if v is not None]
    return None


def sections(run: dict[str, Any], records: list[dict[str, Any]], rows: Rows, group_by: str | None,
             top: int) -> list[str]:
    """The selections, the scores of the picks, their composition, and the top and bottom picks."""
    parts = (run.get("data_sources") or {}).get("parts")
    out = []
    # per selection: rows, unique, repeats
    table_rows = []
    for rec in records:
        idx = rec.get("indices") or []
        score = pick_scores(rec)
        stat = "-"
        if score and score[1]:
            vals = [v for _, v in score[1]]
            stat = f"{score[0]}: mean {fmt(sum(vals) / len(vals))}, min {fmt(min(vals))}, max {fmt(max(vals))}"
        table_rows.append([esc(rec.get("selection", 0) + 1), esc(rec["step"]), esc(len(idx)), esc(len(set(idx))),
                           esc(len(idx) - len(set(idx))), esc(f"{rec.get('seconds', 0):.2f}"), esc(stat)])
    shown = downsample(table_rows, 2 * top) if len(table_rows) > 2 * top else table_rows
    note = f"{len(records)} selections"
    if len(shown) < len(table_rows):
        note += f"; {len(shown)} shown, evenly spaced"
    out.append(section("selections", "Selections", table(
        ["#", "step", "rows", "unique", "repeats", "seconds", "score of the picks"], shown), note))
    # score distribution: picks against the scored pool
    labels, groups = [], []
    score_name = None
    has_pool = False
    for rec in records:
        score = pick_scores(rec)
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
        out.append(section("scores", "Scores of the picks", chart, note))
    else:
        out.append(section("scores", "Scores of the picks", "", "this selector records no per-row score"))
    # composition over selections
    comp = []
    if parts:
        names, counts = group_counts([[source_of(i, parts) for i in rec.get("indices") or []] for rec in records],
                                [p[0] for p in parts])
        comp.append("<h3>by dataset</h3>" + stacked_bars("composition-dataset", [str(r["step"]) for r in records],
                                                         names, counts, "selection at step",
                                                         title="picks by dataset per selection"))
    if group_by:
        names, counts = group_counts([[rows.value(i, group_by) for i in rec.get("indices") or []] for rec in records])
        comp.append(f"<h3>by {esc(group_by)}</h3>" + stacked_bars(
            "composition-group", [str(r["step"]) for r in records], names, counts, "selection at step",
            title=f"picks by {group_by} per selection"))
    out.append(section("composition", "Composition of the picks", "".join(comp),
                        "" if comp else "the run did not record which dataset each row came from"))
    # top and bottom picks
    counts = pick_counts(records)
    score_sum: Counter[int] = Counter()
    score_n: Counter[int] = Counter()
    for rec in records:
        score = pick_scores(rec)
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
        cells += [esc(counts[i]), esc(fmt(mean.get(i)))]
        return cells + text_cells(rows, i)

    out.append(extremes("picks", "Top and bottom picks", ("top", "bottom"), headers, ranked, line, top, rows,
                         f"{len(counts)} distinct rows picked, ranked {how}"))
    return out


def plot(plt: Any, run: dict[str, Any], records: list[dict[str, Any]]) -> Any:
    """How often each row was chosen, and the chosen rows' scores per selection."""
    counts: Counter[int] = Counter()
    for rec in records:
        counts.update(rec["indices"])
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    hist = Counter(counts.get(i, 0) for i in range(run["train_size"]))
    xs = sorted(hist)
    ax1.bar(xs, [hist[x] for x in xs], color="#4c72b0")
    ax1.set_xticks(xs)
    ax1.set_xlabel("times chosen over all selections")
    ax1.set_ylabel("training samples")
    ax1.set_title(f"{run['name']}: {len(counts)} of {run['train_size']} samples chosen")
    data, labels, key = [], [], None
    for rec in records:
        score = primary_score(rec)
        if score:
            key = score[0]
            data.append(score[1])
            labels.append(str(rec["step"]))
    if data:
        ax2.boxplot(data)
        ax2.set_xticks(range(1, len(labels) + 1), labels)
        ax2.set_xlabel("selection at step")
        ax2.set_ylabel(f"{key} of chosen samples")
        ax2.set_title("score distribution per selection")
    else:
        ax2.text(0.5, 0.5, "no per-sample scores recorded", ha="center", va="center")
        ax2.set_axis_off()
    return fig
