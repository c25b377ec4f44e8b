"""``dataflex-cli compare``: does a method beat plain training or random selection, at the same cost?

Layers: :mod:`.stats` and :mod:`.analysis` (intervals, verdicts, tables) and :mod:`.plan` (methods,
budgets, refusals) are torch-free; :mod:`.runner` trains each method x seed through ``dataflex-cli
train``; :mod:`.evaluate` measures checkpoints (torch, LLaMA-Factory's data pipeline); :mod:`.html`
writes the page. From Python: ``dataflex.compare.run(config, methods, seeds, budget, metric, out)``
returns the ``compare.json`` dict.
"""

from __future__ import annotations

from typing import Any


def run(*args: Any, **kwargs: Any) -> dict[str, Any]:
    from .runner import run as _run

    return _run(*args, **kwargs)
