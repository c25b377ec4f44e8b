"""``loss``: reweight the step's samples by where their loss sits in the batch (Sow et al., ICLR 2025).

"Dynamic Loss-Based Sample Reweighting for Improved Large Language Model Pretraining". With l_i
the mean token loss of sample i over the G samples of the optimizer step (all micro-batches and
ranks), the losses are rescaled to [-δ, δ] by the batch's own min and max,

    l̂_i = δ (2 l_i − l_max − l_min) / max(l_max − l_min, 1e-6),

scored by ``strategy``

    linupper   min(l̂ + δ, δ)     rises with the loss: low-loss samples are down-weighted
    uniform    l̂                 the paper code's name; after the softmax it still favours high losses
    quadratic  1 − l̂² / δ²       favours the middle of the batch, down-weights both extremes
    extremes   |l̂|               favours both extremes

and turned into weights w = n · softmax(score / r) (mean 1 over the n samples with a supervised
token; r is the paper's KL-regularisation temperature: large r flattens towards uniform).

Where this departs from the original DataFlex: its weights come from each micro-batch alone
(with ``per_device_train_batch_size: 1`` on one process the weighter does nothing, with 2 the
weights are always {0.27, 0.73}), and ``r`` is fixed at 1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from ..component import register
from .base import Weighter, WeightParams, WeightSignals

STRATEGIES = ("linupper", "uniform", "quadratic", "extremes")


@dataclass
class LossWeightParams(WeightParams):
    strategy: Literal["linupper", "uniform", "quadratic", "extremes"] = field(
        default="linupper", metadata={"help": "Score of the rescaled loss: linupper | uniform | quadratic | extremes."})
    delta: float = field(default=1.0, metadata={"help": "δ: losses are rescaled to [-δ, δ] (> 0)."})
    r: float = field(default=1.0, metadata={"help": "Softmax temperature (> 0); larger is flatter."})

    def check(self) -> None:
        if not (math.isfinite(self.delta) and self.delta > 0):
            self.fail("delta", "a number > 0")
        if not (math.isfinite(self.r) and self.r > 0):
            self.fail("r", "a number > 0")


def rescale(losses: torch.Tensor, delta: float) -> torch.Tensor:
    """Losses mapped linearly onto [-δ, δ] by their min and max (float64)."""
    lo, hi = float(losses.min()), float(losses.max())
    span = max(hi - lo, 1e-6)
    return delta * (2 * losses.double() - hi - lo) / span


def strategy_score(scaled: torch.Tensor, strategy: str, delta: float) -> torch.Tensor:
    if strategy == "linupper":
        return torch.clamp(scaled + delta, max=delta)
    if strategy == "uniform":
        return scaled
    if strategy == "quadratic":
        return 1 - scaled.square() / delta ** 2
    if strategy == "extremes":
        return scaled.abs()
    raise ValueError(f"unknown strategy {strategy!r}; allowed: {', '.join(STRATEGIES)}")


def loss_weights(losses: torch.Tensor, strategy: str, delta: float, r: float) -> torch.Tensor:
    """n · softmax(score(l̂) / r) over finite losses; 1 where the loss is NaN (no supervised token)."""
    out = torch.ones(len(losses), dtype=torch.float64)
    valid = ~torch.isnan(losses)
    n = int(valid.sum())
    if n == 0:
        return out
    score = strategy_score(rescale(losses[valid], delta), strategy, delta)
    out[valid] = n * torch.softmax(score / r, dim=0)
    return out


@register
class LossWeighter(Weighter):
    name = "loss"
    Params = LossWeightParams
    needs = frozenset({"losses"})
    summary = "Sow et al. 2025: weights from each sample's loss, rescaled within the step's global batch"

    def weights(self, signals: WeightSignals) -> tuple[torch.Tensor, dict[str, Any]]:
        p = self.params
        w = loss_weights(signals.losses, p.strategy, p.delta, p.r)
        valid = ~torch.isnan(signals.losses)
        summary: dict[str, Any] = {}
        if bool(valid.any()):
            summary = {"loss_min": float(signals.losses[valid].min()), "loss_max": float(signals.losses[valid].max())}
        return w, summary
