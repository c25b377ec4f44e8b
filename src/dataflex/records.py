"""Selection records: ``{cache_dir}/step_{global_step}.json``, written atomically, checked on load.

A record holds the indices a selection chose (in the order they are consumed), per-sample metrics,
the selector, the selection number and a *fingerprint* of the run (model, data, component and its
params, seed, global batch, schedule). A record is reused only when its fingerprint equals the
current run's; anything else - another run's record, a truncated file - is ignored with a warning.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

logger = logging.getLogger("dataflex")

RECORD_VERSION = 1


def fingerprint(payload: dict[str, Any]) -> str:
    """A short stable hash of a JSON-serialisable description of the run."""
    text = json.dumps(payload, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def record_path(cache_dir: str | os.PathLike, step: int) -> Path:
    return Path(cache_dir) / f"step_{step}.json"


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write JSON to a temp file in the same folder, fsync, then rename over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(obj, fh, ensure_ascii=False)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def write_record(cache_dir: str | os.PathLike, step: int, record: dict[str, Any]) -> Path:
    path = record_path(cache_dir, step)
    atomic_write_json(path, {"version": RECORD_VERSION, **record})
    return path


def load_record(cache_dir: str | os.PathLike, step: int, expected_fingerprint: str) -> dict[str, Any] | None:
    """The record for ``step`` if it exists, parses and belongs to this run; else ``None``."""
    path = record_path(cache_dir, step)
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        indices = record["indices"]
        if not isinstance(indices, list) or not all(isinstance(i, int) for i in indices):
            raise ValueError("indices is not a list of integers")
    except (OSError, ValueError, KeyError, TypeError) as err:
        logger.warning("ignoring unreadable selection record %s (%s); selecting again", path, err)
        return None
    found = record.get("fingerprint")
    if found != expected_fingerprint:
        logger.warning(
            "ignoring selection record %s: it belongs to another run (fingerprint %s, this run %s)",
            path, found, expected_fingerprint,
        )
        return None
    return record
