"""``tsds``: sampling probabilities that match the eval set's distribution, without near-duplicates.

TSDS (Liu et al., "TSDS: Data Selection for Task-Specific Model Finetuning", NeurIPS 2024). With
M eval samples (queries) and the training pool embedded (:mod:`dataflex.scoring.embeddings`), TSDS
looks for a selection distribution p over the pool as a transport plan γ from the queries' empirical
distribution (mass 1/M each) to the pool:

    minimise  (α / C) · Σ_ij γ_ij ||q_i − x_j||  +  (1 − α) · M · max_ij ρ_j γ_ij
    subject to Σ_j γ_ij = 1/M,  γ ≥ 0;           p_j = Σ_i γ_ij

The first term aligns the selection with the eval set (optimal transport); the second caps how
much any one candidate may receive, in proportion to its density ρ_j, so near-duplicates share one
candidate's mass instead of each taking it (the kernel density estimate
ρ_j = Σ over j's ``kde_K`` nearest candidates l of max(0, 1 − ||x_j − x_l||² / σ²), itself
included, so ρ ≥ 1; σ = 0 makes every ρ 1). For a cap u the best plan fills each query's nearest
candidates in order, u / ρ each, until its 1/M is used; the objective is piecewise linear and
convex in u, and the optimal u is where the transport term's slope meets the cap's (found by
scanning the fill events in order, as the paper's implementation does). Only each query's
``max_K`` nearest candidates are considered; like the official code, ``max_K`` and ``kde_K`` are
clamped to a tenth of the pool (at least 2 and 1).

The draw - ``num_samples`` rows from p, without replacement unless fewer candidates have a
positive probability (then with replacement, and a warning) - is seeded and made once, on rank 0
(the original drew independently on every rank, so ranks trained on different subsets, and
crashed when fewer than ``num_samples`` probabilities were positive). ``probs_path`` accepts the
original's precomputed ``.npy`` of probabilities instead.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from ..component import register
from ..errors import ConfigError
from ..scoring.embeddings import EmbeddingSource
from ..scoring.neighbours import top_k
from .base import ScoringParams, SelectionContext, SelectionResult, Selector, logger, weighted_draw


@dataclass
class TsdsParams(ScoringParams):
    probs_path: str | None = field(
        default=None, metadata={"help": "A .npy of one probability per training row (the original's offline file); "
                                        "unset: computed from embeddings."})
    alpha: float = field(default=0.6, metadata={"help": "Alignment (1) vs diversity (0) trade-off, in [0, 1]."})
    C: float = field(default=5.0, metadata={"help": "Scale of the distances (about the embeddings' norm scale) (> 0)."})
    sigma: float = field(default=0.75, metadata={"help": "Kernel size of the density estimate (>= 0; 0: no KDE)."})
    kde_K: int = field(default=1000, metadata={"help": "Neighbours in the density estimate (>= 1)."})
    max_K: int = field(default=5000, metadata={"help": "Nearest candidates considered per query (>= 2)."})
    refresh: bool = field(default=True, metadata={"help": "Embed again with the current model at every selection."})
    replacement: bool = field(default=False, metadata={"help": "Draw with replacement (the paper's multinomial)."})
    embedding_model_name_or_path: str | None = field(
        default=None, metadata={"help": "A frozen HF model to embed with; unset: the training model."})
    embedding_model_dtype: Literal["auto", "float32", "float16", "bfloat16"] = field(default="auto", metadata={
        "help": "dtype of the embedding model."})
    embedding_layer: int = field(default=-1, metadata={"help": "Hidden state to pool (-1: the last layer)."})
    search: Literal["torch", "faiss"] = field(default="torch", metadata={"help": "Exact search backend."})

    def check(self) -> None:
        super().check()
        self.refuse_candidate_pool()
        if not 0 <= self.alpha <= 1:
            self.fail("alpha", "a number in [0, 1]")
        if not (math.isfinite(self.C) and self.C > 0):
            self.fail("C", "a number > 0")
        if not (math.isfinite(self.sigma) and self.sigma >= 0):
            self.fail("sigma", "a number >= 0")
        if self.kde_K < 1:
            self.fail("kde_K", "an integer >= 1")
        if self.max_K < 2:
            self.fail("max_K", "an integer >= 2")
        if self.probs_path is not None:
            load_probabilities(self.probs_path, self._component())


def load_probabilities(path: str, component: str) -> torch.Tensor:
    import numpy as np

    key = f"component '{component}': param 'probs_path'"
    try:
        data = np.load(path)
    except (OSError, ValueError) as err:
        raise ConfigError(f"{key} = '{path}' cannot be read as a .npy file ({err})") from None
    if data.ndim != 1 or not np.all(np.isfinite(data)) or (data < 0).any() or data.sum() <= 0:
        raise ConfigError(f"{key} = '{path}' must hold one probability >= 0 per training row (a 1-D array, not all 0)")
    return torch.from_numpy(data.astype("float64"))


def densities(points: torch.Tensor, kde_k: int, sigma: float) -> torch.Tensor:
    """ρ of every point: Σ over its kde_k nearest points (itself included) of max(0, 1 − d² / σ²)."""
    if sigma == 0:
        return torch.ones(len(points), dtype=torch.float64)
    sims, _ = top_k(points, points, min(kde_k, len(points)))
    d2 = (2 - 2 * sims.double()).clamp(min=0)  # unit vectors: ||a − b||² = 2 − 2 a·b
    return (1 - d2 / sigma ** 2).clamp(min=0).sum(dim=1).clamp(min=1.0)


def tsds_probabilities(dist: torch.Tensor, rho: torch.Tensor, ids: torch.Tensor, n: int, alpha: float, C: float
                       ) -> tuple[torch.Tensor, float]:
    """p over ``n`` candidates from each query's nearest candidates ``ids`` [M, K] (ascending distance ``dist``)
    and their densities ``rho`` [M, K]; returns ``(p, s)`` with the cap u = 1 / (M s)."""
    M, K = dist.shape
    dist, rho = dist.double(), rho.double()
    inv = 1.0 / rho
    cum = inv.cumsum(dim=1)  # s at which query j's k-th neighbour is full
    weighted = (dist * inv).cumsum(dim=1)
    # after event (j, k) the slope contribution of query j is d_{j,k+1} s_{jk} - Σ_{k'<=k} d_{jk'} / ρ_{jk'}
    events_s = cum[:, :-1].reshape(-1)
    contrib = (dist[:, 1:] * cum[:, :-1] - weighted[:, :-1])  # [M, K-1]
    delta = torch.cat([contrib[:, :1], contrib[:, 1:] - contrib[:, :-1]], dim=1).reshape(-1)
    order = torch.sort(events_s, stable=True).indices
    total = delta[order].cumsum(dim=0)
    hit = (alpha / C * total >= (1 - alpha) * M).nonzero()
    # a cap below 1 / (M Σ_k 1/ρ_jk) leaves query j unable to place its 1/M: the smallest feasible
    # cap bounds s, and is the optimum when diversity outweighs every slope change before it
    s_max = float(cum[:, -1].min())
    s = min(float(events_s[order[int(hit[0])]]), s_max) if len(hit) else s_max
    u = 1.0 / (M * s)
    # every query fills its nearest candidates in order, u / ρ each, until its 1/M is used
    cap = (u * inv).clone()
    before = torch.cat([torch.zeros(M, 1, dtype=torch.float64), cap.cumsum(dim=1)[:, :-1]], dim=1)
    gamma = torch.minimum(cap, (1.0 / M - before).clamp(min=0))
    p = torch.zeros(n, dtype=torch.float64)
    p.index_add_(0, ids.reshape(-1), gamma.reshape(-1))
    return p, s


@register
class TsdsSelector(Selector):
    name = "tsds"
    Params = TsdsParams
    needs_eval = True
    summary = "TSDS: optimal-transport alignment with the eval set, density-capped against near-duplicates"

    def __init__(self, params: TsdsParams):
        super().__init__(params)
        self.fixed = load_probabilities(params.probs_path, params._component()) if params.probs_path else None
        self.source = EmbeddingSource(params.embedding_model_name_or_path, params.embedding_layer,
                                      params.embedding_model_dtype, params.scoring_batch_size, params.cache_dir)

    def check_data(self, train_size: int, eval_size: int | None) -> None:
        if self.fixed is not None and len(self.fixed) != train_size:
            raise ConfigError(f"component '{self.params._component()}': param 'probs_path' = '{self.params.probs_path}' "
                              f"has {len(self.fixed)} probabilities for a training set of {train_size} rows")

    def probabilities(self, ctx: SelectionContext) -> tuple[torch.Tensor, dict[str, Any]]:
        p = self.params
        if self.fixed is not None:
            return self.fixed / self.fixed.sum(), {"source": "probs_path"}
        train, queries = self.source.pool_and_queries(ctx, "tsds", p.refresh)
        n = len(train)
        valid = int((~torch.isnan(train).any(dim=1)).sum())
        if len(queries) == 0 or valid < 2:
            raise ValueError("tsds needs at least one eval sample and two training samples with tokens")
        k = max(2, min(p.max_K, n // 10, valid))
        kde_k = max(1, min(p.kde_K, n // 10))
        sims, ids = top_k(queries, train, k, backend=p.search)
        dist = (2 - 2 * sims.double()).clamp(min=0).sqrt()
        union = torch.unique(ids)
        rho_of = torch.zeros(n, dtype=torch.float64)
        rho_of[union] = densities(train[union], kde_k, p.sigma)
        probs, s = tsds_probabilities(dist, rho_of[ids], ids, n, p.alpha, p.C)
        duplicates = float((rho_of[union] - 1).mean())
        return probs, {"max_K": k, "kde_K": kde_k, "s": s, "candidates": int(len(union)),
                       "mean_density": round(duplicates + 1, 6)}

    def select(self, ctx: SelectionContext) -> SelectionResult:
        probs, info = self.probabilities(ctx)
        positive = int((probs > 0).sum())
        picks, replaced = weighted_draw(probs, ctx.num_samples, ctx.generator, self.params.replacement)
        if ctx.rank == 0:
            logger.info("[DataFlex] tsds: %d candidates with a positive probability (%s); %s", positive,
                        ", ".join(f"{k} {v}" for k, v in info.items()),
                        "drawn with replacement" if replaced else "drawn without replacement")
        return SelectionResult(picks, per_sample={"probability": [float(probs[i]) for i in picks]},
                               summary={**info, "positive": positive, "replacement": replaced})

    def state_dict(self) -> dict[str, Any]:
        return self.source.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.source.load_state_dict(state)
