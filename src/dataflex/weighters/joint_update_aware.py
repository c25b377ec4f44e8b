"""``joint_update_aware``: batch-level weights that account for what the rest of the step covers.

With z_i the unit pooled hidden state of row i of the step's global batch, u the unit mean
embedding of the eval set, s_i = u·z_i and S = Z Zᵀ, the weights solve

    max over the simplex   sᵀw − (β/2) wᵀ S w + τ H(w)

Rows aligned with the eval set gain weight (sᵀw); rows that point the same way as other heavy
rows lose some, because their updates would add up (the wᵀSw term); the entropy keeps the
weights spread. The objective is strictly concave (S is positive semi-definite), so the optimum is
unique and interior: the fixed point w = softmax((s − βSw)/τ), reached by the damped iteration
w ← (1−ρ) w + ρ softmax((s − βSw)/τ), with ρ halved whenever a step would move away from the fixed
point (large β/τ), until the residual ‖softmax(...) − w‖₁ < tol. The loss gets B·w (mean 1 over the step, as every weighter here).
u is recomputed every ``target_update_step`` steps and saved in the checkpoint.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from ..component import register
from ..scoring.embeddings import embed_with
from ..seeding import seeded_generator
from .base import WeightContext, Weighter, WeightParams, WeightSignals

logger = logging.getLogger("dataflex")


@dataclass
class JointUpdateAwareParams(WeightParams):
    beta: float = field(default=1.0, metadata={"help": "β >= 0: how much rows that point the same way share weight; "
                                                       "0 gives softmax(s / τ)."})
    tau: float = field(default=0.1, metadata={"help": "τ > 0: entropy temperature; larger spreads the weights."})
    damping: float = field(default=0.5, metadata={"help": "ρ in (0, 1]: step of the damped fixed-point iteration."})
    max_iter: int = field(default=200, metadata={"help": "Iterations at most (>= 1)."})
    tol: float = field(default=1e-8, metadata={"help": "Stop when ‖softmax((s − βSw)/τ) − w‖₁ is below this (> 0)."})
    target_update_step: int = field(default=50, metadata={"help": "Steps between recomputations of the eval "
                                                                  "target u (>= 1)."})
    target_num_batches: int = field(default=0, metadata={"help": "Eval batches u is averaged over (>= 0); 0: the "
                                                                 "whole eval set."})
    target_batch_size: int = field(default=8, metadata={"help": "Eval rows per forward when computing u (>= 1)."})
    layer: int = field(default=-1, metadata={"help": "Hidden state to pool (-1: the last layer; 0: the embeddings)."})
    pooling: Literal["mean", "last"] = field(default="mean", metadata={"help": "mean: masked mean over the row's "
                                                                               "tokens; last: its last token."})

    def check(self) -> None:
        if not (math.isfinite(self.beta) and self.beta >= 0):
            self.fail("beta", "a number >= 0")
        if not (math.isfinite(self.tau) and self.tau > 0):
            self.fail("tau", "a number > 0")
        if not (math.isfinite(self.damping) and 0 < self.damping <= 1):
            self.fail("damping", "a number in (0, 1]")
        if self.max_iter < 1:
            self.fail("max_iter", "an integer >= 1")
        if not (math.isfinite(self.tol) and self.tol > 0):
            self.fail("tol", "a number > 0")
        if self.target_update_step < 1:
            self.fail("target_update_step", "an integer >= 1")
        if self.target_num_batches < 0:
            self.fail("target_num_batches", "an integer >= 0 (0: the whole eval set)")
        if self.target_batch_size < 1:
            self.fail("target_batch_size", "an integer >= 1")


def joint_weights(z: torch.Tensor, u: torch.Tensor, beta: float, tau: float, damping: float = 0.5,
                  max_iter: int = 200, tol: float = 1e-8) -> tuple[torch.Tensor, dict[str, Any]]:
    """Weights on the simplex (float64, summing to 1) for unit rows ``z`` [B, D] and target ``u`` [D].

    Returns ``(w, info)`` with the iterations run, the last residual, the damping in the end and
    whether it converged.
    """
    z = z.double()
    s = z @ u.double()
    gram = z @ z.T

    def residual(w):  # what a full step would change: zero exactly at the fixed point
        target = torch.softmax((s - beta * (gram @ w)) / tau, dim=0)
        return target - w, float((target - w).abs().sum())

    w = torch.full((z.shape[0],), 1.0 / z.shape[0], dtype=torch.float64)
    rho = damping
    step, change = residual(w)
    it = 0
    for it in range(1, max_iter + 1):
        if change < tol:
            break
        new = w + rho * step
        new_step, new_change = residual(new)
        if new_change > change and rho > 1e-6:  # overshoot (large beta / tau): smaller steps from the same point
            rho /= 2
            continue
        w, step, change = new, new_step, new_change
    return w, {"iterations": it, "residual": change, "damping": rho, "converged": change < tol}


@register
class JointUpdateAwareWeighter(Weighter):
    name = "joint_update_aware"
    Params = JointUpdateAwareParams
    needs = frozenset({"embeddings"})
    summary = "weights on the simplex: alignment with the eval set minus overlap with the rest of the step"

    def __init__(self, params: JointUpdateAwareParams):
        super().__init__(params)
        self.embedding_layer = params.layer
        self.embedding_pooling = params.pooling
        self.target: torch.Tensor | None = None  # u, float64, unit length
        self.target_step: int | None = None
        self.warned = False

    def prepare(self, ctx: WeightContext) -> None:
        p = self.params
        if self.target_step is not None and ctx.step - self.target_step < p.target_update_step:
            return
        if ctx.eval_dataset is None or len(ctx.eval_dataset) == 0:
            self.target, self.target_step = None, ctx.step  # the batch's own mean, at weights()
            return
        n = len(ctx.eval_dataset)
        if p.target_num_batches == 0 or p.target_num_batches * p.target_batch_size >= n:
            rows = list(range(n))
        else:  # the same seeded draw on every rank
            gen = seeded_generator(0, "joint_update_aware target", ctx.step)
            rows = sorted(torch.randperm(n, generator=gen)[:p.target_num_batches * p.target_batch_size].tolist())
        emb = embed_with(ctx.scorer, ctx.eval_dataset, rows, p.target_batch_size, p.layer, p.pooling,
                         desc="joint_update_aware target")
        valid = ~torch.isnan(emb[:, 0])
        if not bool(valid.any()):
            raise ValueError("no eval sample has a token to embed (check cutoff_len and eval_dataset)")
        mean = emb[valid].double().mean(dim=0)  # every row counts once, whichever batch it came from
        self.target = mean / mean.norm().clamp(min=1e-30)
        self.target_step = ctx.step

    def weights(self, signals: WeightSignals) -> tuple[torch.Tensor, dict[str, Any]]:
        p = self.params
        z = signals.embeddings
        valid = ~torch.isnan(z[:, 0])
        w = torch.ones(len(z), dtype=torch.float64)
        if not bool(valid.any()):
            return w, {"valid_rows": 0}
        zv = z[valid].double()
        u = self.target
        if u is None:
            if not self.warned:
                logger.warning("[DataFlex] joint_update_aware: no eval_dataset; the target is each step's own "
                               "mean embedding")
                self.warned = True
            mean = zv.mean(dim=0)
            u = mean / mean.norm().clamp(min=1e-30)
        wv, info = joint_weights(zv, u, p.beta, p.tau, p.damping, p.max_iter, p.tol)
        w[valid] = wv * int(valid.sum())  # B·w: mean 1 over the rows that have tokens
        return w, {**info, "target_step": self.target_step, "alignment": float(zv @ u @ wv)}

    def state_dict(self) -> dict[str, Any]:
        if self.target_step is None:
            return {}
        return {"target": self.target.tolist() if self.target is not None else None, "target_step": self.target_step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "target_step" in state:
            self.target = torch.tensor(state["target"], dtype=torch.float64) if state["target"] is not None else None
            self.target_step = int(state["target_step"])
