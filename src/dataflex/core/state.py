"""Resumable state inside the HF checkpoint: ``checkpoint-N/dataflex_state.json``.

The trainer writes it into every checkpoint folder it saves (before the trainer's own files,
so a checkpoint that has them has it too), and a resumed run reads it from the checkpoint it
resumes from - never from ``cache_dir``. It holds what a run needs to continue exactly as an
uninterrupted run would: the run id, a digest of the DataFlex setup (a resume with another
setup is refused), the current stretch's rows, the component's state (a selector's baseline
or cumulative scores, a mixer's weights and statistics, a weighter's anchors) and the
sampler positions. Everything else is derived from seeds.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ..errors import DataFlexError
from .records import atomic_write_json

STATE_FILE = "dataflex_state.json"
STATE_VERSION = 1


class ResumeError(DataFlexError):
    """A checkpoint cannot be resumed by this run (one line naming the checkpoint)."""


def save_state(checkpoint_dir: str | os.PathLike, state: dict[str, Any]) -> Path:
    path = Path(checkpoint_dir) / STATE_FILE
    atomic_write_json(path, {"version": STATE_VERSION, **state})
    return path


def load_state(checkpoint_dir: str | os.PathLike) -> dict[str, Any]:
    path = Path(checkpoint_dir) / STATE_FILE
    if not path.is_file():
        raise ResumeError(f"resume_from_checkpoint: '{checkpoint_dir}' has no {STATE_FILE}: it was not written by a "
                          "DataFlex run with this train_type; start afresh (overwrite_output_dir: true) or resume a "
                          "DataFlex checkpoint")
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ResumeError(f"resume_from_checkpoint: {path} is unreadable ({err})") from None
    if state.get("version") != STATE_VERSION:
        raise ResumeError(f"resume_from_checkpoint: {path} has state version {state.get('version')!r}, "
                          f"this DataFlex reads version {STATE_VERSION}")
    return state


def check_setup(saved: dict[str, Any], current: dict[str, Any], checkpoint_dir: str | os.PathLike) -> None:
    """Refuse a resume whose DataFlex setup differs from the checkpoint's (names what differs)."""
    differ = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
    if differ:
        key = differ[0]
        raise ResumeError(f"resume_from_checkpoint: '{checkpoint_dir}' was written with another DataFlex setup "
                          f"({key}: {saved.get(key)!r} there, {current.get(key)!r} now); resume with the same "
                          "configuration, or start afresh")
