"""What every mode's round shares: the protocol, the records, the time spent deciding, stretches.

A round is a plain object (no transformers, no LLaMA-Factory) where a mode's decisions are made,
agreed across ranks (:class:`~dataflex.dist.agreement.Agreement`) and recorded. The rounds of the
modes live beside their modes (:mod:`dataflex.modes`); a round's :meth:`state_dict` goes into the
HF checkpoint (:mod:`dataflex.core.state`).
"""

from __future__ import annotations

import logging
import math
from typing import Any, Callable, Sequence

import torch

from ..dist.agreement import Agreement
from ..schedule import Schedule, Stretch
from ..seeding import seeded_generator
from .records import RunLog

logger = logging.getLogger("dataflex")
LogFn = Callable[[dict[str, float]], None]


def _no_log(_: dict[str, float]) -> None:
    pass


def summary_scalars(prefix: str, values: Sequence[float]) -> dict[str, float]:
    """``{prefix_mean, prefix_min, prefix_max}`` of the finite ``values``."""
    finite = [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    if not finite:
        return {}
    t = torch.tensor(finite, dtype=torch.float64)
    return {f"{prefix}_mean": round(float(t.mean()), 6), f"{prefix}_min": round(float(t.min()), 6),
            f"{prefix}_max": round(float(t.max()), 6)}


class Round:
    """What every mode's round has: the protocol, the run's records, the time spent deciding."""

    what = "decision"

    def __init__(self, agreement: Agreement, log: RunLog | None, seed: int, log_fn: LogFn | None = None):
        self.agreement = agreement
        self.log = log  # None until training starts (the mode's start() hands it the run's records)
        self.seed = seed
        self.log_fn = log_fn or _no_log
        self.seconds = 0.0
        self.history: list[dict[str, Any]] = []

    @property
    def rank(self) -> int:
        return self.agreement.rank

    def info(self, msg: str, *args: Any) -> None:
        if self.rank == 0:
            logger.info("[DataFlex] " + msg, *args)

    def warning(self, msg: str, *args: Any) -> None:
        if self.rank == 0:
            logger.warning("[DataFlex] " + msg, *args)


# ---------------------------------------------------------------------------------------------- stretches
class StretchRound(Round):
    """select and mix: the schedule's stretches, each fed by one draw of ``G x steps`` rows."""

    def __init__(self, schedule: Schedule, agreement: Agreement, log: RunLog | None, seed: int,
                 log_fn: LogFn | None = None):
        super().__init__(agreement, log, seed, log_fn)
        self.schedule = schedule
        self.stretch: Stretch | None = None
        self.indices: list[int] = []

    def rows(self, step: int) -> list[int]:
        """The ``G`` training rows of optimizer step ``step``, in the order ranks split them."""
        stretch = self.schedule.stretch_at(step)
        if self.stretch is None or self.stretch.index != stretch.index:
            self.indices = self._enter(stretch)
            self.stretch = stretch
        g = self.schedule.global_batch
        offset = (step - stretch.start_step) * g
        return self.indices[offset: offset + g]

    def _enter(self, stretch: Stretch) -> list[int]:  # pragma: no cover - interface
        raise NotImplementedError

    def _order(self, n: int, stretch: Stretch) -> list[int]:
        """The seeded consumption order of a draw of ``n`` rows."""
        tag = stretch.number if stretch.is_update else f"stretch-{stretch.index}"
        return torch.randperm(n, generator=seeded_generator(self.seed, "order", tag)).tolist()

    def state_dict(self) -> dict[str, Any]:
        return {"stretch": self.stretch.index if self.stretch is not None else None, "indices": list(self.indices)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        index = state.get("stretch")
        if index is not None:
            self.stretch = self.schedule.stretches[int(index)]
            self.indices = [int(i) for i in state["indices"]]
