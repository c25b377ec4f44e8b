"""The reorderer interface (``train_type: dynamic_reorder``).

A reorderer decides the order in which training rows are consumed, and nothing else: it turns
per-row scores into an ordering of the rows it is handed (a permutation of them), and - for a
competence-based curriculum - says which share of the ordered rows a step may draw from. Which
rows are still to be consumed, epochs, ranks, records and checkpoints are the mode's business
(:mod:`dataflex.modes.reorder`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, Sequence

import torch

from ..component import Component
from ..params import Params


@dataclass
class ReorderParams(Params):
    """Parameters every reorderer has."""

    order: Literal["ascending", "descending"] = field(
        default="ascending",
        metadata={"help": "ascending: lowest score first (short / low-loss / low-difficulty rows first: an easy-to-hard "
                          "curriculum); descending: highest first."},
    )
    scoring_batch_size: int = field(
        default=16, metadata={"help": "Rows per scoring forward pass when the score needs the model (per rank)."}
    )

    def check(self) -> None:
        if self.scoring_batch_size < 1:
            self.fail("scoring_batch_size", "an integer >= 1")


@dataclass
class ReorderContext:
    """Everything one ordering may use. Built by the mode on every rank."""

    step: int  # optimizer steps done so far
    number: int  # 0-based number of this ordering over the run
    rows: list[int]  # the rows to order: those not yet consumed in this epoch, in their current order
    train_dataset: Any
    scorer: Any  # dataflex.scoring.engine.ScoringEngine (the current model is scorer.model)
    generator: torch.Generator  # seeded from the run's seed and the ordering number
    column: list[float] | None = None  # the declared dataset column, one value per training row

    @property
    def train_size(self) -> int:
        return len(self.train_dataset)


@dataclass
class OrderResult:
    """The rows in consumption order, and the score each row was ordered by (None: not scored)."""

    rows: list[int]
    scores: list[float | None]
    summary: dict[str, Any] = field(default_factory=dict)

    def check(self, expected: Sequence[int]) -> None:
        if sorted(self.rows) != sorted(expected):
            raise ValueError(f"reorderer returned {len(self.rows)} rows that are not a permutation of the "
                             f"{len(expected)} rows it was asked to order")
        if len(self.scores) != len(self.rows):
            raise ValueError(f"reorderer returned {len(self.scores)} scores for {len(self.rows)} rows")


def sort_rows(rows: Sequence[int], scores: Sequence[float | None], descending: bool,
              generator: torch.Generator) -> list[int]:
    """``rows`` sorted by ``scores``, ties in a seeded random order, rows without a score (None, NaN) last."""
    shuffled = torch.randperm(len(rows), generator=generator).tolist()

    def key(p: int) -> tuple[int, float]:
        s = scores[p]
        if s is None or (isinstance(s, float) and math.isnan(s)):
            return (1, 0.0)
        return (0, -float(s) if descending else float(s))

    return [rows[p] for p in sorted(shuffled, key=key)]  # sorted() is stable: ties keep the shuffled order


class Reorderer(Component):
    """Base class. Subclasses set ``name`` and ``Params`` and implement :meth:`order`."""

    kind: ClassVar[str] = "reorderers"
    Params: ClassVar[type[Params]] = ReorderParams
    dynamic: ClassVar[bool] = False  # re-orders every update_step (True) or once (False)

    @property
    def column(self) -> str | None:
        """The dataset column the reorderer reads (one numeric value per training row), or None."""
        return None

    def order(self, ctx: ReorderContext) -> OrderResult:  # pragma: no cover - interface
        """The rows of ``ctx.rows`` in the order they are to be consumed. Runs on every rank (model
        scoring is a collective); the mode takes rank 0's answer."""
        raise NotImplementedError

    def competence(self, t: int, steps: int) -> float | None:
        """Share of the ordered rows a step may draw from, ``t`` steps into a curriculum of ``steps``
        steps after the warm-up; None: no pacing (every row once per epoch, in order)."""
        return None
