"""``loss``: favour a band of the per-sample loss distribution.

Scored samples are split by two quantiles of their losses into low (l <= q1), medium
(q1 < l <= q2) and high (l > q2). Every sample has weight 1, the focus band ``focus_weight``;
p_i = (w_i + eps)^(1/T) / sum_j (w_j + eps)^(1/T) with T = temperature. The draw is without
replacement unless asked for, or unless fewer valid samples than requested exist (then with
replacement and a warning). Samples without a supervised token are never drawn.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

from ..component import register
from .base import (
    ScoringParams,
    SelectionContext,
    SelectionResult,
    Selector,
    candidate_indices,
    logger,
    nothing_supervised,
    pool_scores,
    sampling_probabilities,
    weighted_draw,
)

BANDS = ("low", "medium", "high")


@dataclass
class LossParams(ScoringParams):
    focus: Literal["low", "medium", "high"] = field(default="high", metadata={"help": "Band to up-weight."})
    focus_weight: float = field(default=5.0, metadata={"help": "Weight of the focus band (others: 1)."})
    quantiles: list[float] = field(
        default_factory=lambda: [0.33, 0.66], metadata={"help": "Two increasing split points in [0, 1]."}
    )
    replacement: bool = field(default=False, metadata={"help": "Draw with replacement."})
    temperature: float = field(default=1.0, metadata={"help": "> 1 flattens, < 1 sharpens the distribution."})
    record_scores: bool = field(
        default=False, metadata={"help": "Also write every scored row's score into the record's summary "
                                         "(pool_scores), e.g. to measure how well the score finds noisy rows."})

    def check(self) -> None:
        super().check()
        q = self.quantiles
        if len(q) != 2 or not (0.0 <= q[0] < q[1] <= 1.0):
            self.fail("quantiles", "two increasing numbers in [0, 1], e.g. [0.33, 0.66]")
        if self.focus_weight <= 0:
            self.fail("focus_weight", "a number > 0")
        if self.temperature <= 0:
            self.fail("temperature", "a number > 0")


def band_of(losses: torch.Tensor, q1: float, q2: float) -> torch.Tensor:
    """0 = low (l <= q1), 1 = medium (q1 < l <= q2), 2 = high (l > q2); -1 for NaN."""
    bands = torch.full(losses.shape, -1, dtype=torch.long)
    valid = ~torch.isnan(losses)
    bands[valid & (losses <= q1)] = 0
    bands[valid & (losses > q1) & (losses <= q2)] = 1
    bands[valid & (losses > q2)] = 2
    return bands


def loss_weights(losses: torch.Tensor, quantiles: list[float], focus: str, focus_weight: float):
    """Per-sample weights (0 for NaN), the two thresholds and the band of every sample."""
    valid = ~torch.isnan(losses)
    q = torch.quantile(losses[valid], torch.tensor(quantiles, dtype=losses.dtype))
    q1, q2 = float(q[0]), float(q[1])
    bands = band_of(losses, q1, q2)
    weights = valid.double()
    weights[bands == BANDS.index(focus)] = focus_weight
    return weights, (q1, q2), bands


@register
class LossSelector(Selector):
    name = "loss"
    Params = LossParams
    summary = "sample by loss band (quantiles), up-weighting the focus band"

    def select(self, ctx: SelectionContext) -> SelectionResult:
        p = self.params
        pool = candidate_indices(ctx, p.candidate_pool)
        losses = ctx.scorer.losses(ctx.train_dataset, pool, p.scoring_batch_size)
        invalid = int(torch.isnan(losses).sum())
        if invalid and ctx.rank == 0:
            logger.info("[DataFlex] %d of %d samples have no supervised token: not scored, never selected",
                        invalid, len(pool))
        if invalid == len(pool):
            raise nothing_supervised()
        weights, (q1, q2), bands = loss_weights(losses, p.quantiles, p.focus, p.focus_weight)
        probs = sampling_probabilities(weights, p.temperature)
        picks, replaced = weighted_draw(probs, ctx.num_samples, ctx.generator, p.replacement)
        counts = {name: int((bands == i).sum()) for i, name in enumerate(BANDS)}
        if ctx.rank == 0:
            logger.info("[DataFlex] loss bands: thresholds %.4f / %.4f, counts %s, focus '%s'", q1, q2, counts, p.focus)
        summary = {"thresholds": [q1, q2], "band_counts": counts, "unscored": invalid, "replacement": replaced}
        if p.record_scores:
            summary["pool_scores"] = pool_scores(pool, losses)
        return SelectionResult(
            [pool[i] for i in picks],
            per_sample={"loss": [float(losses[i]) for i in picks], "band": [BANDS[int(bands[i])] for i in picks]},
            summary=summary,
        )
