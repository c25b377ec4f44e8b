"""``dataflex-cli report DIR --export-dataset OUT``: the rows a run trained on by choice, as dataset
files registered in ``OUT/dataset_info.json``. Whether a mode's runs can be exported is its report
module's rule (``export_refusal``)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from .reader import mode_of, mode_report
from .rows import dataset_info, source_rows


def export_subset(run: dict[str, Any], records: list[dict[str, Any]], out_dir: str | os.PathLike,
                  name: str = "dataflex_selected", repeats: bool = False) -> list[str]:
    """Write the rows a run trained on by choice as dataset files registered in ``out_dir/dataset_info.json``.

    One file per source dataset (same format and column mapping as the source). Rows are written
    once each, in index order, unless ``repeats`` (then once per time chosen). Returns the
    registered dataset names.
    """
    refusal = mode_report(mode_of(run)).export_refusal(run)
    if refusal:
        raise ConfigError(refusal)
    sources = run.get("data_sources") or {}
    parts = sources.get("parts")
    if not parts:
        raise ConfigError("cannot export: this run does not know which dataset each sample came from "
                          "(interleaved mixing, val_size, streaming, stage pt or a pre-tokenized set)")
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
