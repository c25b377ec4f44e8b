"""``less``: choose the training samples whose Adam update points towards the eval set's gradient.

LESS (Xia et al., ICML 2024), run online at every selection ``i`` with the model as it is after
the last optimizer step (parameters θ_i, learning rate η_i):

* eval feature of every eval sample z': its plain per-sample gradient ∇ℓ(z'; θ_i);
* train feature of every candidate z: its Adam update direction
  Γ(z) = m' / (√v' + ε), m' = β1·m + (1−β1)·g, v' = β2·v + (1−β2)·g², from its per-sample
  gradient g and the optimizer's current moments m, v (``gradient_type: sgd``, or an optimizer
  without moments yet: Γ = g, with a warning);
* both projected with the same seeded count sketch to ``proj_dim`` numbers and L2-normalised;
* Score_i(z) = mean over z' of cos(Γ(z), ∇ℓ(z')),  S(z) = Σ_{j ≤ i} η_j · Score_j(z), where η_j
  is the learning rate of the parameter group holding the LoRA A matrices (``learning_rate``;
  with LoRA+ the B group runs at a multiple of it on the same schedule, so using either gives the
  same ranking);
* the ``num_samples`` (G × update_step) samples with the highest S are chosen (ties: higher
  current Score, then lower index). ``cumulative: false`` ranks by the current Score alone.

Gradients are those of the trainable LoRA parameters, a whole batch per forward + backward
(:mod:`dataflex.scoring.gradients`), sharded over ranks; only the scores travel between ranks.
S is kept as the selector's state and saved with every selection record, so a resumed run
continues the same sums.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from ..component import register
from ..scoring.gradients import GradientFeaturizer, sharded_features
from ..scoring.optimizer_state import adam_moments
from ..scoring.projection import CountSketchProjector
from .base import (
    ScoringParams,
    SelectionContext,
    SelectionResult,
    Selector,
    candidate_indices,
    logger,
    nothing_supervised,
    take_ranked,
)


@dataclass
class GradientFeatureParams(ScoringParams):
    """What LESS and its relatives (icons) need to build the projected gradient features."""

    gradient_type: Literal["adam", "sgd"] = field(
        default="adam",
        metadata={"help": "Train feature: the Adam update direction (adam) or the plain gradient (sgd)."},
    )
    proj_dim: int = field(default=8192, metadata={"help": "Dimension of the random projection of the gradients."})
    seed: int = field(default=123, metadata={"help": "Seed of the random projection (same on every rank)."})


@dataclass
class LessParams(GradientFeatureParams):
    cumulative: bool = field(
        default=True,
        metadata={"help": "Rank by S = sum of lr x Score over the selections so far (true) or by this Score only."},
    )
    eval_aggregate: Literal["mean", "task_max"] = field(
        default="mean",
        metadata={"help": "mean: Score = mean cosine over all eval rows; task_max: the mean within each eval dataset, "
                          "then the max over the datasets (official LESS matching.py; needs several eval datasets "
                          "with eval_on_each_dataset: true)."},
    )

    inert = {"save_interval": "the original's interval for flushing gradient files; here no gradient is stored, "
                              "only scores, computed in memory at every selection"}

    def check(self) -> None:
        super().check()
        if self.proj_dim < 1:
            self.fail("proj_dim", "an integer >= 1 (e.g. 4096 or 8192)")


def eval_targets(feats: torch.Tensor, groups: list[tuple[str, int, int]] | None, aggregate: str,
                 selector: str) -> tuple[torch.Tensor, int]:
    """The eval side as a ``[G, proj_dim]`` matrix from unit eval features ``[M, proj_dim]`` (NaN rows:
    no supervised token): one row, the mean of all valid rows (``mean``), or one mean per eval group
    (``task_max``; a row's Score is then its largest cosine-mean over the groups). Returns it and the
    number of valid eval rows."""
    if aggregate == "mean":
        valid = valid_rows(feats)
        return feats[valid].mean(dim=0, keepdim=True), int(valid.sum())
    if not groups or len(groups) < 2:
        raise ValueError(f"selector '{selector}': eval_aggregate: task_max needs several eval datasets (give them "
                         "as eval_dataset: a,b with eval_on_each_dataset: true); got one eval set")
    return group_means(feats, groups, selector)


def valid_rows(feats: torch.Tensor) -> torch.Tensor:
    """Mask of the eval rows that have a feature; an error when none has."""
    valid = ~torch.isnan(feats[:, 0])
    if not bool(valid.any()):
        raise nothing_supervised("eval")
    return valid


def group_means(feats: torch.Tensor, groups: list[tuple[str, int, int]], selector: str,
                what: str = "eval dataset") -> tuple[torch.Tensor, int]:
    """One mean of the valid unit eval features per ``(name, start, end)`` group: ``[G, proj_dim]``,
    and the number of valid eval rows. A group without a valid row is an error."""
    valid = valid_rows(feats)
    rows = []
    for name, start, end in groups:
        part = feats[start:end][valid[start:end]]
        if len(part) == 0:
            raise ValueError(f"selector '{selector}': {what} '{name}' has no row with a supervised token")
        rows.append(part.mean(dim=0))
    return torch.stack(rows), int(valid.sum())


def rank_order(key: torch.Tensor, score: torch.Tensor) -> list[int]:
    """Positions with a finite ``key``, best first: higher key, then higher score, then lower position."""
    valid = [i for i in range(len(key)) if not math.isnan(float(key[i]))]
    return sorted(valid, key=lambda i: (-float(key[i]), -float(score[i]), i))


@register
class LessSelector(Selector):
    name = "less"
    Params = LessParams
    needs_eval = True
    supported_finetuning = ("lora",)
    summary = "LESS: Adam-direction gradients of the LoRA weights aligned with the eval set's gradients"

    def __init__(self, params: LessParams):
        super().__init__(params)
        self.projector = CountSketchProjector(params.proj_dim, params.seed)
        self.cumulative: torch.Tensor | None = None  # S per training index (float64, NaN: never scored)
        self.learning_rates: list[float] = []  # η_j of every selection folded into S

    # ------------------------------------------------------------------ state (travels in the records)
    def state_dict(self) -> dict[str, Any]:
        if self.cumulative is None:
            return {}
        return {"cumulative_score": _nan_to_none(self.cumulative.tolist()), "learning_rates": list(self.learning_rates)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("cumulative_score") is not None:
            self.cumulative = torch.tensor(_none_to_nan(state["cumulative_score"]), dtype=torch.float64)
            self.learning_rates = [float(v) for v in state.get("learning_rates", [])]

    # ------------------------------------------------------------------ selection
    def eval_target(self, ctx: SelectionContext, plain: GradientFeaturizer) -> tuple[torch.Tensor, int]:
        """LESS's validation side: the mean of the eval samples' unit gradient features (one row, or
        one per eval dataset with ``eval_aggregate: task_max``), and the number of eval samples."""
        eval_feats = sharded_features(ctx.scorer, ctx.eval_dataset, range(len(ctx.eval_dataset)),
                                      self.params.scoring_batch_size, plain, desc="LESS eval gradients")
        return eval_targets(eval_feats, ctx.eval_groups, self.params.eval_aggregate, self.name)

    def target_scores(self, ctx: SelectionContext) -> tuple[list[int], torch.Tensor, str, int]:
        """The pool, every pool row's Score against every eval target (``[P, G]`` float64, NaN rows:
        no supervised token), the train feature used (``adam``, or ``sgd`` when asked for or when the
        optimizer has no moments yet) and the number of eval rows."""
        p = self.params
        engine = ctx.scorer
        model = engine.model
        if ctx.eval_dataset is None or len(ctx.eval_dataset) == 0:
            raise ValueError(f"selector '{self.name}' needs eval_dataset, and the eval set is empty")
        pool = candidate_indices(ctx, p.candidate_pool)

        plain = GradientFeaturizer(model, self.projector)
        target, n_eval = self.eval_target(ctx, plain)

        gradient_type = p.gradient_type
        moments = None
        if gradient_type == "adam":
            with ctx.agreement.section(f"{self.name}: gathering Adam moments"):  # DeepSpeed gathers them collectively
                moments, reason = adam_moments(ctx.optimizer, model, plain.param_names, engine.device)
            if moments is None:
                gradient_type = "sgd"
                if ctx.rank == 0:
                    logger.warning("[DataFlex] %s: %s; selection %d uses plain gradients (sgd) for the training "
                                   "samples", self.name, reason, ctx.selection + 1)
        train = GradientFeaturizer(model, self.projector, moments)
        target_dev = target.to(engine.device)  # [G, proj_dim]: one row per eval target
        per_target = sharded_features(engine, ctx.train_dataset, pool, p.scoring_batch_size, train,
                                      reduce=lambda f: f @ target_dev.T, desc=f"{self.name} train gradients")
        return pool, per_target.reshape(len(pool), -1).double(), gradient_type, n_eval

    def accumulate(self, ctx: SelectionContext, pool: list[int], score: torch.Tensor) -> torch.Tensor:
        """Add η · ``score`` (``[P]`` or ``[P, K]``, NaN rows: unscored) to the running sums of the pool's
        rows and return the sums of the pool (NaN for the rows unscored now)."""
        lr = float(ctx.learning_rate)
        shape = (ctx.train_size, *score.shape[1:])
        if self.cumulative is None or tuple(self.cumulative.shape) != shape:
            if self.cumulative is not None and ctx.rank == 0:
                logger.warning("[DataFlex] %s: stored cumulative scores have the shape %s, this run needs %s: "
                               "starting afresh", self.name, tuple(self.cumulative.shape), shape)
            self.cumulative = torch.full(shape, float("nan"), dtype=torch.float64)
            self.learning_rates = []
        pool_t = torch.tensor(pool, dtype=torch.long)
        scored = scored_rows(score)
        before = self.cumulative[pool_t]
        after = torch.where(torch.isnan(before), torch.zeros_like(before), before) + lr * score
        self.cumulative[pool_t[scored]] = after[scored]
        self.learning_rates.append(lr)
        S = self.cumulative[pool_t]
        return torch.where(torch.isnan(score), torch.full_like(S, float("nan")), S)  # unscored now: no candidate

    def select(self, ctx: SelectionContext) -> SelectionResult:
        p = self.params
        pool, per_target, gradient_type, n_eval = self.target_scores(ctx)
        score = per_target.max(dim=1).values  # one eval target, or the best of several (task_max)
        lr = float(ctx.learning_rate)
        S = self.accumulate(ctx, pool, score)
        scored = scored_rows(score)

        order = rank_order(S if p.cumulative else score, score)
        if not order:
            raise nothing_supervised()
        positions, repeated = take_ranked(len(order), ctx.num_samples, self.name, ctx.rank)
        picks = [order[r] for r in positions]
        unscored = int((~scored).sum())
        if ctx.rank == 0:
            chosen = score[torch.tensor(picks)]
            logger.info("[DataFlex] %s: %d eval / %d train gradients (%s, proj_dim %d, lr %.3g); Score of the pool "
                        "mean %.4f max %.4f, of the chosen mean %.4f; %d unscored", self.name, n_eval,
                        int(scored.sum()), gradient_type, p.proj_dim, lr, float(score[scored].mean()),
                        float(score[scored].max()), float(chosen.mean()), unscored)
        return SelectionResult(
            [pool[i] for i in picks],
            per_sample={"score": [float(score[i]) for i in picks], "cumulative_score": [float(S[i]) for i in picks]},
            summary={
                "gradient_type": gradient_type,
                "learning_rate": lr,
                "ranked_by": "cumulative_score" if p.cumulative else "score",
                "eval_samples": n_eval,
                "eval_aggregate": p.eval_aggregate,
                "scored": int(scored.sum()),
                "unscored": unscored,
                "pool_score_mean": float(score[scored].mean()),
                "replacement": repeated,
                **self.summary_extra(),
            },
        )

    def summary_extra(self) -> dict[str, Any]:
        """More of the selection's summary (for subclasses)."""
        return {}


def scored_rows(score: torch.Tensor) -> torch.Tensor:
    """Mask of the rows of ``[P]`` or ``[P, K]`` scores that have a score (NaN: none)."""
    return ~torch.isnan(score.reshape(len(score), -1)[:, 0])


def _nan_to_none(values: Any) -> Any:
    if isinstance(values, list):
        return [_nan_to_none(v) for v in values]
    return None if math.isnan(values) else values


def _none_to_nan(values: Any) -> Any:
    if isinstance(values, list):
        return [_none_to_nan(v) for v in values]
    return float("nan") if values is None else float(values)
