"""The text report every mode shares: the header about the run, then the mode's own lines (from its
report module), then what could not be read. Nothing here names a mode."""

from __future__ import annotations

from collections import Counter
from typing import Any

from .reader import RunFolder, mode_report
from .rows import source_of


def header(found: RunFolder) -> list[str]:
    run = found.manifest
    params = {k: v for k, v in run["params"].items() if v is not None}
    parts = (run.get("data_sources") or {}).get("parts")
    desc = ", ".join(f"{n} [{s}, {e})" for n, s, e in parts) if parts else "sources unknown"
    return [
        f"DataFlex run {run['run_id']} in {found.shown_output_dir}",
        f"  {run['train_type']}: component '{run['component']}' ({run['name']}), params {params}",
        f"  train set: {run['train_size']} rows ({desc}); global batch {run['global_batch']}; "
        f"records {found.shown_records}",
    ]


def summary(found: RunFolder, top: int = 10) -> str:
    """The whole text report of a run."""
    lines = header(found)
    lines += mode_report(found.mode).summary(found.manifest, found.records, top, found.damaged)
    if found.damaged:
        lines.append(f"\nDamaged records, not counted ({len(found.damaged)}):")
        lines += [f"  {d}" for d in found.damaged]
    lines += [f"\nNot found: {note}" for note in found.notes]
    return "\n".join(lines)


def by_source(counts: Counter, parts: list[list[Any]], train_size: int) -> str:
    """How many of the counted picks fell in each source dataset, against its share of the train set."""
    total = sum(counts.values())
    by: Counter[str] = Counter()
    for i, c in counts.items():
        by[source_of(i, parts)] += c
    return ", ".join(f"{name} {by.get(name, 0)} ({100 * by.get(name, 0) / max(total, 1):.1f}% of picks, "
                     f"{end - start} samples = {100 * (end - start) / train_size:.1f}% of the set)"
                     for name, start, end in parts)
