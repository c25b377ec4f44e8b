"""What a run decided: summary text, plots, and exporting the selected rows as a dataset.

Reads ``{output_dir}/dataflex/run.json`` (written when training starts: mode, component, schedule,
which rows come from which dataset, the run id and its record folder) and that run's records
only (``step_*.json``; weight mode: ``weights.jsonl``; reorder mode: ``order.jsonl``).
"""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path
from typing import Any

from .core.records import MANIFEST, manifest_path, primary_score, read_lines, read_records
from .errors import ConfigError



def load_run(path: str | os.PathLike) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """``(manifest, records sorted by step)`` for an output_dir (or the folder holding run.json)."""
    path = Path(path)
    candidates = [manifest_path(path), path / MANIFEST]
    found = next((c for c in candidates if c.is_file()), None)
    if found is None:
        raise ConfigError(f"no DataFlex run found in '{path}' (expected {candidates[0]}); "
                          "was it trained with train_type set?")
    try:
        run = json.loads(found.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ConfigError(f"'{found}' is not a readable DataFlex manifest ({err})") from None
    from .modes import BY_NAME

    folder = Path(run["records"])
    mode = BY_NAME.get(run.get("mode", "select"))
    if mode is not None and mode.lines:
        records = read_lines(folder / mode.lines)
    else:
        records = read_records(folder, run["run_id"])
    return run, records


def source_of(index: int, parts: list[list[Any]] | None) -> str:
    for name, start, end in parts or []:
        if start <= index < end:
            return name
    return "?"


def _header(run: dict[str, Any]) -> list[str]:
    params = {k: v for k, v in run["params"].items() if v is not None}
    parts = (run.get("data_sources") or {}).get("parts")
    desc = ", ".join(f"{n} [{s}, {e})" for n, s, e in parts) if parts else "sources unknown"
    return [
        f"DataFlex run {run['run_id']} in {run['output_dir']}",
        f"  {run['train_type']}: component '{run['component']}' ({run['name']}), params {params}",
        f"  train set: {run['train_size']} rows ({desc}); global batch {run['global_batch']}; records {run['records']}",
    ]


def summary(run: dict[str, Any], records: list[dict[str, Any]], top: int = 10) -> str:
    mode = run.get("mode", "select")
    lines = _header(run)
    if mode == "weight":
        lines += _weight_summary(run, records, top)
    elif mode == "mix":
        lines += _mix_summary(run, records)
    elif mode == "reorder":
        lines += _reorder_summary(run, records)
    else:
        lines += _select_summary(run, records, top)
    return "\n".join(lines)


def _select_summary(run: dict[str, Any], records: list[dict[str, Any]], top: int) -> list[str]:
    sched = run["schedule"]
    lines = [f"  schedule: {sched['total_steps']} steps x {sched['global_batch']} samples, warm-up {sched['warmup_step']}, "
             f"{sched['update_times']} x {sched['update_step']} steps per cycle, selections at steps {sched['updates']}"]
    parts = (run.get("data_sources") or {}).get("parts")
    missing = [s for s in sched["updates"] if s not in {r["step"] for r in records}]
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
            lines.append("  picks by dataset: " + _by_source(counts, parts, run["train_size"]))
    return lines


def _by_source(counts: Counter, parts: list[list[Any]], train_size: int) -> str:
    total = sum(counts.values())
    by_source: Counter[str] = Counter()
    for i, c in counts.items():
        by_source[source_of(i, parts)] += c
    return ", ".join(f"{name} {by_source.get(name, 0)} ({100 * by_source.get(name, 0) / max(total, 1):.1f}% of picks, "
                     f"{end - start} samples = {100 * (end - start) / train_size:.1f}% of the set)"
                     for name, start, end in parts)


def _mix_summary(run: dict[str, Any], records: list[dict[str, Any]]) -> list[str]:
    sched = run["schedule"]
    domains = records[0]["domains"] if records else [p[0] for p in (run.get("data_sources") or {}).get("parts") or []]
    lines = [f"  schedule: {sched['total_steps']} steps x {sched['global_batch']} rows, warm-up {sched['warmup_step']}, "
             f"updates every {sched['update_step']} steps at {sched['updates'][:12]}"
             + (" ..." if len(sched["updates"]) > 12 else "")]
    lines.append(f"\nStretches ({len(records)} recorded); proportions and rows drawn per domain:")
    width = max([len(d) for d in domains] + [8])
    lines.append(f"  {'step':>6} {'kind':>7}  " + "  ".join(f"{d:>{width}}" for d in domains) + "  loss weights")
    totals = [0] * len(domains)
    for rec in records:
        for d, c in enumerate(rec["counts"]):
            totals[d] += c
        cells = "  ".join(f"{p:>{width}.3f}" for p in rec["proportions"])
        lw = rec.get("loss_weights")
        lines.append(f"  {rec['step']:>6} {rec['kind']:>7}  {cells}  " + (", ".join(f"{w:.3f}" for w in lw) if lw else "-"))
    grand = sum(totals) or 1
    lines.append("\nRows drawn per domain over the run: " + ", ".join(
        f"{d} {n} ({100 * n / grand:.1f}%)" for d, n in zip(domains, totals)))
    return lines


def _weight_summary(run: dict[str, Any], lines_in: list[dict[str, Any]], top: int) -> list[str]:
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


def _reorder_summary(run: dict[str, Any], lines_in: list[dict[str, Any]]) -> list[str]:
    import statistics

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


# --------------------------------------------------------------------------------------------- plots
def plot_run(output_dir: str | os.PathLike) -> list[Path]:
    """The PNG of a finished run beside LLaMA-Factory's training_loss.png (``plot_loss: true``)."""
    from .modes import BY_NAME

    run, records = load_run(output_dir)
    mode = BY_NAME[run.get("mode", "select")]
    path = Path(output_dir) / mode.plot_file
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = mode.module.plot(plt, run, records)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return [path]


# --------------------------------------------------------------------------------------------- export
def _read_rows(path: Path) -> list[Any]:
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    return json.loads(text)


def dataset_info(sources: dict[str, Any]) -> dict[str, Any]:
    """The ``dataset_info.json`` a run's datasets were registered in (ConfigError if unreadable)."""
    info_path = Path(sources["dataset_dir"]) / "dataset_info.json"
    try:
        return json.loads(info_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise ConfigError(f"{info_path} is not readable") from None


def source_rows(sources: dict[str, Any], src: str, attrs: dict[str, Any]) -> list[Any]:
    """The rows of one source dataset, in file order: a run's index ``start + i`` is row ``i``.

    Only local json/jsonl files can be read back (hub datasets may have changed since the run).
    """
    file_name = attrs.get("file_name")
    if not file_name or any(k in attrs for k in ("hf_hub_url", "ms_hub_url", "om_hub_url", "script_url")):
        raise ConfigError(f"dataset '{src}': only local json/jsonl files can be read back")
    path = Path(sources["dataset_dir"]) / file_name
    try:
        return _read_rows(path)
    except (OSError, ValueError) as err:
        raise ConfigError(f"dataset '{src}': {path} is not readable ({err})") from None


def export_subset(run: dict[str, Any], records: list[dict[str, Any]], out_dir: str | os.PathLike,
                  name: str = "dataflex_selected", repeats: bool = False) -> list[str]:
    """Write the rows a run trained on by choice as dataset files registered in ``out_dir/dataset_info.json``.

    One file per source dataset (same format and column mapping as the source). Rows are written
    once each, in index order, unless ``repeats`` (then once per time chosen). Returns the
    registered dataset names.
    """
    if run.get("mode") == "weight":
        raise ConfigError("cannot export: a weighting run trains on every row (export the weights from weights.jsonl)")
    if run.get("mode") == "reorder":
        raise ConfigError("cannot export: a reorder run trains on every row, only in another order (the order of "
                          "consumption is in order.jsonl)")
    sources = run.get("data_sources") or {}
    parts = sources.get("parts")
    if not parts:
        raise ConfigError("cannot export: this run does not know which dataset each sample came from "
                          "(interleaved mixing, val_size, streaming, stage pt or a pre-tokenized set)")
    if run.get("mode") == "mix":
        raise ConfigError("cannot export rows of a mixing run as text: with stage pt they are token blocks; "
                          "use the proportions it recorded (init_mixture_proportions) instead")
    try:
        source_info = dataset_info(sources)
    except ConfigError as err:
        raise ConfigError(f"cannot export: {err}") from None
    picks: list[int] = []
    for rec in records:
        picks.extend(rec["indices"])
    if not repeats:
        picks = sorted(set(picks))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    info_out = out / "dataset_info.json"
    registry = json.loads(info_out.read_text(encoding="utf-8")) if info_out.is_file() else {}
    names = []
    for src, start, end in parts:
        rows = [i - start for i in picks if start <= i < end]
        if not rows:
            continue
        attrs = dict(source_info.get(src) or {})
        try:
            data = source_rows(sources, src, attrs)
        except ConfigError as err:
            raise ConfigError(f"cannot export {err}") from None
        entry = name if len(parts) == 1 else f"{name}_{src}"
        target = f"{entry}.json"
        (out / target).write_text(json.dumps([data[r] for r in rows], ensure_ascii=False, indent=1) + "\n",
                                  encoding="utf-8")
        attrs["file_name"] = target
        registry[entry] = attrs
        names.append(entry)
    info_out.write_text(json.dumps(registry, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    return names
