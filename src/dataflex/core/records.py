"""Records: write-only logs of what a run decided, one folder per run.

Layout::

    <output_dir>/dataflex/run.json        the manifest: run id, where the records are, schedule, data
    <cache_dir>/<run id>/step_<N>.json    one record per decision (selection / mixture update)
    <cache_dir>/<run id>/weights.jsonl    weight mode: one line per optimizer step

``cache_dir`` defaults to ``<output_dir>/dataflex``. The run id is new for every fresh start
and carried through checkpoints, so a resumed run keeps writing into its own folder, and runs
that share a ``cache_dir`` never see each other's records. Nothing is ever read back to train:
resumable state lives in the HF checkpoint (:mod:`dataflex.core.state`); ``dataflex-cli report``
reads these files.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import tempfile
import time
from pathlib import Path
from typing import Any

RECORD_VERSION = 2
MANIFEST = "run.json"


def fingerprint(payload: Any) -> str:
    """A short stable hash of a JSON-serialisable description."""
    text = json.dumps(payload, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def new_run_id() -> str:
    """``YYYYmmdd-HHMMSS-xxxxxx``: sortable by start time, unique across concurrent starts."""
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"


def manifest_path(output_dir: str | os.PathLike) -> Path:
    return Path(output_dir) / "dataflex" / MANIFEST


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write JSON to a temp file in the same folder, fsync, then rename over ``path``."""
    atomic_write_text(path, json.dumps(obj, ensure_ascii=False))


def atomic_write_text(path: str | os.PathLike, text: str, shared: bool = False) -> None:
    """Write ``text`` to a temp file in the same folder, fsync, then rename over ``path``: readers see the
    old file or the whole new one. ``shared``: the permissions of a plain new file (umask), not mkstemp's 0600."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        if shared:
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def check_writable(folder: str | os.PathLike, key: str) -> None:
    """Create ``folder`` if needed and prove a file can be written there; ConfigError naming ``key`` if not."""
    from ..errors import ConfigError

    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".dataflex-write-test.", dir=folder)
        os.close(fd)
        os.unlink(tmp)
    except OSError as err:
        raise ConfigError(f"{key}: cannot write to '{folder}': {err.strerror or err}") from None


class RunLog:
    """The records of one run (rank 0 writes; other ranks hold a no-op log)."""

    def __init__(self, cache_dir: str | os.PathLike, run_id: str, enabled: bool = True):
        self.cache_dir = Path(cache_dir)
        self.run_id = run_id
        self.folder = self.cache_dir / run_id
        self.enabled = enabled

    def record_path(self, step: int) -> Path:
        return self.folder / f"step_{step}.json"

    def write_record(self, step: int, record: dict[str, Any]) -> Path | None:
        if not self.enabled:
            return None
        path = self.record_path(step)
        atomic_write_json(path, {"version": RECORD_VERSION, "run_id": self.run_id, **record})
        return path

    def append(self, name: str, line: dict[str, Any]) -> None:
        """One JSON line in ``<folder>/<name>`` (weights per step and the like)."""
        if not self.enabled:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        with (self.folder / name).open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(line, ensure_ascii=False, separators=(",", ":")) + "\n")

    def truncate(self, name: str, keep: Any) -> None:
        """Drop the lines of ``<folder>/<name>`` for which ``keep(line)`` is false (a resume re-writes them)."""
        path = self.folder / name
        if not self.enabled or not path.is_file():
            return
        lines = [ln for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
        kept = [ln for ln in lines if keep(json.loads(ln))]
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text("".join(ln + "\n" for ln in kept), encoding="utf-8")
        os.replace(tmp, path)

    def write_manifest(self, output_dir: str | os.PathLike, manifest: dict[str, Any]) -> None:
        if not self.enabled:
            return
        atomic_write_json(manifest_path(output_dir), {"run_id": self.run_id, "records": str(self.folder.resolve()),
                                                     **manifest})


def read_records(folder: str | os.PathLike, run_id: str | None = None,
                 damaged: list[tuple[str, str]] | None = None) -> list[dict[str, Any]]:
    """Every readable ``step_*.json`` of a run folder, sorted by step.

    An unreadable file is skipped; with ``damaged`` given, ``(file name, reason)`` is added to it.
    """
    out = []
    for path in sorted(Path(folder).glob("step_*.json")):
        try:
            rec = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            if damaged is not None:
                damaged.append((path.name, _reason(err)))
            continue
        if not isinstance(rec, dict):
            if damaged is not None:
                damaged.append((path.name, f"a JSON {type(rec).__name__}, not a record"))
            continue
        if run_id is not None and rec.get("run_id") != run_id:
            continue
        out.append(rec)
    out.sort(key=lambda r: r.get("step", 0))
    return out


def read_lines(path: str | os.PathLike, damaged: list[tuple[str, str]] | None = None) -> list[dict[str, Any]]:
    """The JSON lines of ``path`` ([] if there is no file); with ``damaged`` given, an unreadable line adds
    ``("<file> line N", reason)`` to it."""
    path = Path(path)
    if not path.is_file():
        return []
    out = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                out.append(json.loads(line))
            except ValueError as err:
                if damaged is not None:
                    damaged.append((f"{path.name} line {number}", _reason(err)))
                continue
    return out


def _reason(err: Exception) -> str:
    if isinstance(err, OSError):
        return err.strerror or str(err)
    return f"not valid JSON: {err}"


def primary_score(rec: dict[str, Any]) -> tuple[str, list[float]] | None:
    """The first per-sample list of floats of a selection record (the selector's score)."""
    for key, values in (rec.get("per_sample") or {}).items():
        if values and all(isinstance(v, float) for v in values):
            return key, values
    return None
