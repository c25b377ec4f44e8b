"""``delta_loss``: follow the samples whose loss has dropped most since the first selection.

First selection: score every training sample (the baseline l_init, kept as the selector's
state so it survives a restart) and return a uniform random draw. Later selections: with
l_now the current losses, Δ_i = l_init_i − l_now_i, sorted in descending order. A window of
``window_size`` x N ranks slides from the largest drops towards the smallest as training goes:
with t the 0-based number of this delta selection and T the number of delta selections minus one,

    u = sigmoid(k · (t/T − 0.5))          (t/T := 0 when T = 0)
    start = ⌊u · (N − sN)⌋,  end = start + ⌊sN⌋, cut at the first rank whose Δ < 0

(The seed page writes u = σ(t/T); taken literally, t/T ∈ [0, 1] keeps u in [0.5, 0.73] and the
window never reaches the first or last ranks. Centring and scaling the argument, σ(k(t/T − ½)),
moves it from the largest drops to the smallest over training, which is what the page describes.)

Ranks inside [start, end) get weight ``inside_weight`` (1.0), the others ``outside_weight``
(0.025); the draw is then made as in the ``loss`` selector. With ``outside_weight: 0`` and an
empty window (a reachable state: every scored sample got worse), the draw falls back to the
samples whose loss did not rise, or to all scored samples if none, with a warning.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

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
    uniform_draw,
    weighted_draw,
)


@dataclass
class DeltaLossParams(ScoringParams):
    window_size: float = field(default=0.2, metadata={"help": "Window width as a fraction of N, in (0, 1]."})
    sharpness: float = field(default=10.0, metadata={"help": "k in u = sigmoid(k (t/T - 0.5)): how fast the window moves."})
    inside_weight: float = field(default=1.0, metadata={"help": "Sampling weight of ranks inside the window."})
    outside_weight: float = field(default=0.025, metadata={"help": "Sampling weight of ranks outside the window."})
    record_scores: bool = field(
        default=False, metadata={"help": "Also write every scored row's loss drop (baseline - now) into the record's summary "
                                         "(pool_scores), e.g. to measure how well the score finds noisy rows."})

    def check(self) -> None:
        super().check()
        if not 0.0 < self.window_size <= 1.0:
            self.fail("window_size", "a fraction in (0, 1]")
        if self.sharpness <= 0:
            self.fail("sharpness", "a number > 0")
        if self.inside_weight <= 0:
            self.fail("inside_weight", "a number > 0")
        if self.outside_weight < 0:
            self.fail("outside_weight", "a number >= 0")


def _floor(x: float) -> int:
    return math.floor(round(x, 9))  # 0.29 * 100 is 28.999999999999996 in binary: count it as 29


def window_bounds(sorted_deltas: torch.Tensor, t: int, T: int, window_size: float, sharpness: float) -> tuple[int, int, float]:
    """``(start, end, u)`` of the window over Δ sorted in descending order (end exclusive)."""
    n = len(sorted_deltas)
    ratio = 0.0 if T == 0 else t / T
    u = 1.0 / (1.0 + math.exp(-sharpness * (ratio - 0.5)))
    width = _floor(window_size * n)
    start = _floor(u * (n - window_size * n))
    end = start + width
    negative = (sorted_deltas < 0).nonzero()
    if len(negative):
        end = min(end, int(negative[0]))
    return start, max(end, start), u


@register
class DeltaLossSelector(Selector):
    name = "delta_loss"
    Params = DeltaLossParams
    summary = "sliding window over the loss drop since the first selection"

    def __init__(self, params: DeltaLossParams):
        super().__init__(params)
        self.baseline: torch.Tensor | None = None
        self.baseline_selection: int | None = None

    def state_dict(self) -> dict[str, Any]:
        if self.baseline is None:
            return {}
        values = [None if math.isnan(v) else v for v in self.baseline.tolist()]
        return {"baseline": values, "baseline_selection": self.baseline_selection}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("baseline") is not None:
            self.baseline = torch.tensor([float("nan") if v is None else v for v in state["baseline"]], dtype=torch.float64)
            self.baseline_selection = int(state["baseline_selection"])

    def select(self, ctx: SelectionContext) -> SelectionResult:
        p = self.params
        if self.baseline is None or len(self.baseline) != ctx.train_size:
            self.baseline = ctx.scorer.losses(ctx.train_dataset, range(ctx.train_size), p.scoring_batch_size,
                                              desc="baseline losses")
            if bool(torch.isnan(self.baseline).all()):  # no later selection could score anything either
                raise nothing_supervised()
            self.baseline_selection = ctx.selection
            picks, replaced = uniform_draw(ctx.train_size, ctx.num_samples, ctx.generator)
            if ctx.rank == 0:
                logger.info("[DataFlex] delta_loss: baseline losses of %d samples stored; random draw this time",
                            ctx.train_size)
            return SelectionResult(picks, summary={"phase": "baseline", "replacement": replaced})

        pool = candidate_indices(ctx, p.candidate_pool)
        now = ctx.scorer.losses(ctx.train_dataset, pool, p.scoring_batch_size)
        delta = self.baseline[pool] - now
        valid = (~torch.isnan(delta)).nonzero().flatten()
        if len(valid) == 0:
            raise nothing_supervised()
        order = valid[torch.argsort(delta[valid], descending=True, stable=True)]
        sorted_delta = delta[order]
        t = ctx.selection - self.baseline_selection - 1
        T = max(ctx.num_selections - self.baseline_selection - 1, 1) - 1
        start, end, u = window_bounds(sorted_delta, t, T, p.window_size, p.sharpness)
        weights = torch.full((len(order),), p.outside_weight, dtype=torch.float64)
        weights[start:end] = p.inside_weight
        fallback = None
        if not bool((weights > 0).any()):
            # outside_weight 0 and an empty window (every sample got worse, or the window was cut to
            # nothing): draw from the samples whose loss did not get worse, or from all if none
            fallback = "delta>=0" if bool((sorted_delta >= 0).any()) else "all"
            weights = (sorted_delta >= 0).double() if fallback == "delta>=0" else torch.ones(len(order), dtype=torch.float64)
            if ctx.rank == 0:
                logger.warning("[DataFlex] delta_loss: the window [%d, %d) is empty and outside_weight is 0: drawing "
                               "uniformly from %s", start, end,
                               "the samples whose loss did not rise" if fallback == "delta>=0" else "every scored sample")
        picks, replaced = weighted_draw(sampling_probabilities(weights), ctx.num_samples, ctx.generator)
        if ctx.rank == 0:
            logger.info("[DataFlex] delta_loss: window [%d, %d) of %d ranks (u=%.3f, t=%d, T=%d); %d sample(s) got worse",
                        start, end, len(order), u, t, T, int((sorted_delta < 0).sum()))
        return SelectionResult(
            [pool[int(order[i])] for i in picks],
            per_sample={"delta": [float(sorted_delta[i]) for i in picks], "rank": [int(i) for i in picks]},
            summary={"window": [start, end], "u": u, "t": t, "T": T, "unscored": int(len(pool) - len(valid)),
                     "replacement": replaced, "fallback": fallback,
                     **({"pool_scores": pool_scores(pool, delta)} if p.record_scores else {})},
        )
