"""``dynamic``: every ``update_step`` steps, the rows not yet consumed in this epoch are ordered by
their loss under the current model; rows already consumed stay consumed.

With ``candidate_pool`` only a seeded random share of the remaining rows is scored at each update;
those come first, in score order, and the unscored rest follows in its previous order (the next
update scores a fresh pool). A new epoch starts in a seeded random order until the next update.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch

from ..component import register
from ..core.sampling import pool_positions
from .base import OrderResult, ReorderContext, Reorderer, ReorderParams, sort_rows


@dataclass
class DynamicParams(ReorderParams):
    score: Literal["loss"] = field(
        default="loss", metadata={"help": "loss: each remaining row's mean token loss under the current model."}
    )
    candidate_pool: int | float | None = field(
        default=None,
        metadata={"help": "Score only a seeded random pool of the remaining rows per update: a count (int) or a "
                          "fraction in (0, 1]. Unset: every remaining row."},
    )

    def check(self) -> None:
        super().check()
        self.check_count_or_fraction("candidate_pool")


def pool_of(rows: list[int], pool: int | float | None, generator: torch.Generator) -> list[int]:
    """The rows to score: all of ``rows``, or a seeded random subset (in their order in ``rows``)."""
    return [rows[p] for p in pool_positions(len(rows), pool, generator)]


@register
class DynamicReorderer(Reorderer):
    name = "dynamic"
    Params = DynamicParams
    summary = "every update_step, order the rows left in the epoch by their current loss"
    dynamic = True

    def order(self, ctx: ReorderContext) -> OrderResult:
        p = self.params
        pool = pool_of(ctx.rows, p.candidate_pool, ctx.generator)
        losses = ctx.scorer.losses(ctx.train_dataset, pool, p.scoring_batch_size,
                                   desc=f"reorder {ctx.number + 1}: scoring losses")
        values = [None if math.isnan(v) else float(v) for v in losses.tolist()]
        by_row = dict(zip(pool, values))
        ranked = sort_rows(pool, values, p.order == "descending", ctx.generator)
        scored = set(pool)
        rows = ranked + [r for r in ctx.rows if r not in scored]
        return OrderResult(rows, [by_row.get(r) for r in rows], {"scored": len(pool)})
