"""What a run selected: summary text, a plot, and exporting the selected subset as a dataset.

Reads ``{output_dir}/dataflex/run.json`` (written when training starts) and the run's selection
records (``step_{N}.json`` in its cache_dir, filtered by the run's fingerprint).
"""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path
from typing import Any

from .errors import ConfigError

MANIFEST = "run.json"
PLOT_NAME = "dataflex_selection.png"


def manifest_path(output_dir: str | os.PathLike) -> Path:
    return Path(output_dir) / "dataflex" / MANIFEST


def load_run(path: str | os.PathLike) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """``(manifest, records sorted by step)`` for an output_dir (or the folder holding run.json)."""
    path = Path(path)
    candidates = [manifest_path(path), path / MANIFEST]
    found = next((c for c in candidates if c.is_file()), None)
    if found is None:
        raise ConfigError(f"no DataFlex run found in '{path}' (expected {candidates[0]}); "
                          "was it trained with train_type: dynamic_select?")
    run = json.loads(found.read_text(encoding="utf-8"))
    cache_dir = Path(run.get("cache_dir") or found.parent)
    records = []
    for rec_path in cache_dir.glob("step_*.json"):
        try:
            rec = json.loads(rec_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if rec.get("fingerprint") == run["fingerprint"]:
            records.append(rec)
    records.sort(key=lambda r: r["step"])
    return run, records


def primary_score(metric: dict[str, Any], n: int) -> tuple[str, list[float]] | None:
    """The first per-sample float metric of a record (the selector's score)."""
    for key, values in metric.items():
        if isinstance(values, list) and len(values) == n and values and all(isinstance(v, float) for v in values):
            return key, values
    return None


def source_of(index: int, parts: list[list[Any]] | None) -> str:
    for name, start, end in parts or []:
        if start <= index < end:
            return name
    return "?"


def summary(run: dict[str, Any], records: list[dict[str, Any]], top: int = 10) -> str:
    lines = []
    sched = run["schedule"]
    params = {k: v for k, v in run["params"].items() if v is not None}
    lines.append(f"DataFlex run in {run['output_dir']}")
    lines.append(f"  selector '{run['selector']}' (component '{run['component']}'), params {params}")
    lines.append(f"  schedule: {sched['total_steps']} steps x {sched['global_batch']} samples, "
                 f"warm-up {sched['warmup_step']}, {sched['update_times']} x {sched['update_step']} steps per cycle, "
                 f"selections at steps {sched['selections']}")
    sources = run.get("data_sources") or {}
    parts = sources.get("parts")
    desc = ", ".join(f"{n} [{s}, {e})" for n, s, e in parts) if parts else "sources unknown"
    lines.append(f"  train set: {run['train_size']} samples ({desc}); fingerprint {run['fingerprint']}")
    missing = [s for s in sched["selections"] if s not in {r["step"] for r in records}]
    lines.append(f"\nSelections ({len(records)} recorded" + (f", missing steps {missing}" if missing else "") + "):")
    lines.append(f"  {'#':>3} {'step':>6} {'samples':>8} {'unique':>7} {'seconds':>8}  score (mean / min / max)")
    counts: Counter[int] = Counter()
    for rec in records:
        idx = rec["indices"]
        counts.update(idx)
        score = primary_score(rec.get("metric", {}), len(idx))
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
        most = ", ".join(f"{i} (x{c})" for i, c in counts.most_common(top))
        lines.append(f"  most chosen: {most}")
        if parts:
            by_source: Counter[str] = Counter()
            for i, c in counts.items():
                by_source[source_of(i, parts)] += c
            lines.append("  picks by dataset: " + ", ".join(
                f"{name} {by_source.get(name, 0)} ({100 * by_source.get(name, 0) / total:.1f}% of picks, "
                f"{end - start} samples = {100 * (end - start) / run['train_size']:.1f}% of the set)"
                for name, start, end in parts))
    return "\n".join(lines)


def plot_selections(cache_dir: str | os.PathLike, output_dir: str | os.PathLike) -> Path:
    """PNG beside LLaMA-Factory's training_loss.png: selection counts and score distributions."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run, records = load_run(output_dir)
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
    ax1.set_title(f"{run['selector']}: {len(counts)} of {run['train_size']} samples chosen")
    data, labels = [], []
    key = None
    for rec in records:
        score = primary_score(rec.get("metric", {}), len(rec["indices"]))
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
    fig.tight_layout()
    path = Path(output_dir) / PLOT_NAME
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _read_rows(path: Path) -> list[Any]:
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    return json.loads(text)


def export_subset(run: dict[str, Any], records: list[dict[str, Any]], out_dir: str | os.PathLike,
                  name: str = "dataflex_selected", repeats: bool = False) -> list[str]:
    """Write the selected samples as dataset files registered in ``out_dir/dataset_info.json``.

    One file per source dataset (same format and column mapping as the source). Samples are
    written once each, in index order, unless ``repeats`` (then once per time chosen).
    Returns the registered dataset names.
    """
    sources = run.get("data_sources") or {}
    parts = sources.get("parts")
    if not parts:
        raise ConfigError("cannot export: this run does not know which dataset each sample came from "
                          "(interleaved mixing, val_size, streaming or a pre-tokenized set)")
    info_path = Path(sources["dataset_dir"]) / "dataset_info.json"
    try:
        source_info = json.loads(info_path.read_text(encoding="utf-8"))
    except OSError:
        raise ConfigError(f"cannot export: {info_path} is not readable") from None
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
        file_name = attrs.get("file_name")
        if not file_name or any(k in attrs for k in ("hf_hub_url", "ms_hub_url", "om_hub_url", "script_url")):
            raise ConfigError(f"cannot export dataset '{src}': only local json/jsonl files can be exported")
        data = _read_rows(Path(sources["dataset_dir"]) / file_name)
        entry = name if len(parts) == 1 else f"{name}_{src}"
        target = f"{entry}.json"
        (out / target).write_text(json.dumps([data[r] for r in rows], ensure_ascii=False, indent=1) + "\n",
                                  encoding="utf-8")
        attrs["file_name"] = target
        registry[entry] = attrs
        names.append(entry)
    info_out.write_text(json.dumps(registry, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    return names
