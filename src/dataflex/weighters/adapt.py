"""``adapt``: weight each sample by how close it is to the eval set (ADAPT, arXiv 2605.05227, ICLR 2026).

Representation: φ(x) = the masked mean of the model's last hidden state over the sample's tokens,
L2-normalised (:mod:`dataflex.scoring.embeddings`). Anchors: φ of every ``eval_dataset`` sample,
recomputed with the current model at the first weighted step and then every
``refresh_interval`` steps (once per refresh; the original re-embedded the eval set on every
micro-batch of a refresh step). With a_j the anchors,

    s_i = mean_j cos(φ_i, a_j) = φ_i · ā,    ā = mean_j a_j
    w_i = σ(s_i / τ), capped at ``clip`` when set, then rescaled to mean 1 over the step

The rescaling keeps the loss on the scale of plain training: the original sums the weighted
per-sample losses, so its effective learning rate grows with the batch size. The paper pools
hidden states with weights rising along the sequence; the plain masked mean is used here (the
same as the selectors' embeddings). ā is saved in the checkpoint, so a resumed run uses the
same anchors an uninterrupted run would until the next refresh.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from ..component import register
from ..scoring.embeddings import embed
from .base import WeightContext, Weighter, WeightParams, WeightSignals


@dataclass
class AdaptParams(WeightParams):
    tau: float = field(default=1.0, metadata={"help": "τ in σ(s / τ) (> 0); weights spread most where s / τ is "
                                                          "about 1.3, not at all once σ saturates."})
    refresh_interval: int = field(default=50, metadata={"help": "Steps between anchor refreshes (>= 1)."})
    anchor_batch_size: int = field(default=8, metadata={"help": "Eval samples per forward when embedding anchors."})
    clip: float | None = field(default=None, metadata={"help": "Upper cap of σ(s / τ) before rescaling (> 0); "
                                                               "null: none. Values >= 1 never bind."})

    def check(self) -> None:
        if not (math.isfinite(self.tau) and self.tau > 0):
            self.fail("tau", "a number > 0")
        if self.refresh_interval < 1:
            self.fail("refresh_interval", "an integer >= 1")
        if self.anchor_batch_size < 1:
            self.fail("anchor_batch_size", "an integer >= 1")
        if self.clip is not None and not (math.isfinite(self.clip) and self.clip > 0):
            self.fail("clip", "a number > 0, or null")


def adapt_weights(embeddings: torch.Tensor, anchor: torch.Tensor, tau: float, clip: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(weights before rescaling, similarity s)``; rows without tokens (NaN) get weight 1 and s NaN."""
    s = embeddings.double() @ anchor.double()
    w = torch.sigmoid(s / tau)
    if clip is not None:
        w = torch.clamp(w, max=clip)
    return torch.where(torch.isnan(s), torch.ones_like(w), w), s


@register
class AdaptWeighter(Weighter):
    name = "adapt"
    Params = AdaptParams
    needs = frozenset({"embeddings"})
    needs_eval = True
    summary = "ADAPT: weights from the similarity of each sample's hidden state to the eval set's"

    def __init__(self, params: AdaptParams):
        super().__init__(params)
        self.anchor: torch.Tensor | None = None  # ā, float64
        self.anchor_step: int | None = None

    def prepare(self, ctx: WeightContext) -> None:
        p = self.params
        if self.anchor is not None and ctx.step - self.anchor_step < p.refresh_interval:
            return
        if ctx.eval_dataset is None or len(ctx.eval_dataset) == 0:
            raise ValueError("weighter 'adapt' needs a non-empty eval_dataset for its anchors")
        anchors = embed(ctx.scorer, ctx.eval_dataset, range(len(ctx.eval_dataset)), p.anchor_batch_size,
                        desc="ADAPT anchors")
        valid = ~torch.isnan(anchors[:, 0])
        if not bool(valid.any()):
            raise ValueError("no eval sample has a token to embed (check cutoff_len and eval_dataset)")
        self.anchor = anchors[valid].double().mean(dim=0)
        self.anchor_step = ctx.step

    def weights(self, signals: WeightSignals) -> tuple[torch.Tensor, dict[str, Any]]:
        p = self.params
        w, s = adapt_weights(signals.embeddings, self.anchor, p.tau, p.clip)
        finite = s[~torch.isnan(s)]
        return w, {"anchor_similarity": float(finite.mean()) if len(finite) else None, "anchor_step": self.anchor_step}

    def state_dict(self) -> dict[str, Any]:
        if self.anchor is None:
            return {}
        return {"anchor": self.anchor.tolist(), "anchor_step": self.anchor_step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("anchor") is not None:
            self.anchor = torch.tensor(state["anchor"], dtype=torch.float64)
            self.anchor_step = int(state["anchor_step"])
