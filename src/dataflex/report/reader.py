"""The one reader of a finished (or running) DataFlex run folder.

A run leaves ``<output_dir>/dataflex/run.json`` (the manifest) and a records folder, by default
``<output_dir>/dataflex/<run id>/``, holding ``step_<N>.json`` records or, for a mode with a
``lines`` file in the mode table, one JSON line per step. The manifest names the records folder by
the absolute path it had at training time; the reader re-bases that path on the folder it is
given, so a run that was moved, copied or unpacked elsewhere reads exactly as in place (and a copy
never reads the original's records). Only records kept outside the output dir (``cache_dir``
elsewhere) are looked for at their recorded path.

Torch-free: it reads JSON files, nothing else.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..core.records import MANIFEST, manifest_path, read_lines, read_records
from ..errors import ConfigError


@dataclass(frozen=True)
class Damage:
    """A record file (or one line of a lines file) that exists but cannot be read."""

    file: str  # its name in the records folder ("step_5.json", "weights.jsonl line 7")
    reason: str
    step: int | None = None  # the step a ``step_<N>.json`` stands for

    def __str__(self) -> str:
        return f"{self.file} ({self.reason})"


@dataclass
class RunFolder:
    """What one run left on disk, read from where it is now."""

    folder: Path  # the output dir as given (resolved)
    manifest: dict[str, Any]
    records: list[dict[str, Any]]  # step records, or the lines of the mode's lines file, sorted by step
    records_dir: Path  # where the records were read from
    damaged: list[Damage] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # what the reader could not find, one line each

    def step_records(self) -> list[dict[str, Any]]:
        """The run's ``step_<N>.json`` records sorted by step, whatever its mode reports from."""
        return read_records(self.records_dir, self.manifest["run_id"])

    def lines(self, name: str) -> list[dict[str, Any]]:
        """The lines of a JSON-lines record of the run (``weights.jsonl``, ``order.jsonl``)."""
        return read_lines(self.records_dir / name)

    @property
    def mode(self) -> str:
        return mode_of(self.manifest)

    @property
    def moved(self) -> bool:
        """The run is read from another place than the one it was trained in."""
        trained = self.manifest.get("output_dir")
        return trained is None or Path(trained).resolve() != self.folder

    @property
    def shown_output_dir(self) -> str:
        """The output dir as a report names it: as recorded when in place, else where it is now."""
        if not self.moved:
            return str(self.manifest["output_dir"])
        return f"{self.folder} (trained in {self.manifest.get('output_dir')})"

    @property
    def shown_records(self) -> str:
        return str(self.manifest["records"]) if not self.moved else str(self.records_dir)


def find_manifest(path: str | os.PathLike) -> Path:
    """``run.json`` of an output_dir (or of the folder holding it); ConfigError if there is none."""
    path = Path(path)
    candidates = [manifest_path(path), path / MANIFEST]
    found = next((c for c in candidates if c.is_file()), None)
    if found is None:
        raise ConfigError(f"no DataFlex run found in '{path}' (expected {candidates[0]}); "
                          "was it trained with train_type set?")
    return found


def records_dir(manifest: dict[str, Any], folder: Path) -> Path:
    """The run's records folder, found relative to ``folder`` (the output dir as it is now) when the
    run kept them inside its output dir, else at the path the manifest recorded."""
    recorded = Path(manifest["records"])
    trained = manifest.get("output_dir")
    if trained:
        for base in (Path(trained), Path(trained).resolve()):
            try:
                return folder / recorded.relative_to(base)
            except ValueError:
                continue
    return recorded


def read_run(path: str | os.PathLike) -> RunFolder:
    """Read a run: its manifest, its records (step files or the mode's lines file) and what is damaged."""
    found = find_manifest(path)
    try:
        manifest = json.loads(found.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ConfigError(f"'{found}' is not a readable DataFlex manifest ({err})") from None
    if not isinstance(manifest, dict) or "records" not in manifest or "run_id" not in manifest:
        raise ConfigError(f"'{found}' is not a DataFlex manifest (no run_id or records)")
    folder = found.parent.parent.resolve()  # run.json sits in <output_dir>/dataflex/
    where = records_dir(manifest, folder)
    from ..modes import BY_NAME

    mode = BY_NAME.get(mode_of(manifest))
    damaged: list[tuple[str, str]] = []
    if mode is not None and mode.lines:
        records = read_lines(where / mode.lines, damaged)
    else:
        records = read_records(where, manifest["run_id"], damaged)
    parts = getattr(mode.report_module(), "read_parts", None) if mode is not None else None
    if parts is not None:  # a mode whose records have parts (a pipeline's stages): read beside the manifest
        manifest = {**manifest, "stage_records": parts(where, damaged)}
    notes = [] if where.is_dir() else [f"records folder {where} not found"]
    return RunFolder(folder, manifest, records, where, [Damage(f, r, _step_of(f)) for f, r in damaged], notes)


def mode_of(manifest: dict[str, Any]) -> str:
    """The mode a manifest names; a manifest from before modes were recorded is the table's first mode's."""
    from ..modes import TABLE

    return manifest.get("mode") or TABLE[0].name


def mode_report(mode: str) -> Any:
    """The report module of a mode (the mode table's ``report``); ConfigError for a mode this DataFlex lacks."""
    from ..modes import BY_NAME

    info = BY_NAME.get(mode)
    if info is None:
        raise ConfigError(f"the run's mode '{mode}' is unknown to this DataFlex (known: {', '.join(BY_NAME)})")
    return info.report_module()


def grouping_modes() -> list[str]:
    """The modes whose HTML page can group rows by a dataset column (``--group-by``)."""
    from ..modes import TABLE

    return [m.name for m in TABLE if m.report_module().GROUP_BY]


def load_run(path: str | os.PathLike) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """``(manifest, records sorted by step)`` of an output_dir (or of the folder holding run.json)."""
    run = read_run(path)
    return run.manifest, run.records


def read_trace(folder: str | os.PathLike) -> dict[int, list[dict[str, Any]]]:
    """``{rank: [lines in file order]}`` of the per-micro-batch trace a run writes when tracing is on
    (``DATAFLEX_TRACE_DIR``: ``trace_rank<R>.jsonl``, one ``{"step", "indices", ...}`` per batch)."""
    out = {}
    for path in sorted(Path(folder).glob("trace_rank*.jsonl")):
        out[int(path.stem.removeprefix("trace_rank"))] = read_lines(path)
    return out


def _step_of(name: str) -> int | None:
    stem = name.removesuffix(".json")
    if stem.startswith("step_") and stem[5:].isdigit():
        return int(stem[5:])
    return None
