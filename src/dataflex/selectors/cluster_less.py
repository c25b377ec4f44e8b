"""``cluster_less``: LESS scores for clusters of the pool, from a few representatives per cluster.

The pool is embedded once (:mod:`dataflex.scoring.embeddings`; cached by content) and clustered
with seeded k-means in torch (``cluster_size`` 64: ⌈N/64⌉ clusters). At each selection:

1. ``samples_per_cluster`` representatives per cluster are chosen (``random``, seeded by ``seed``
   and the selection; ``nearest`` / ``farthest`` to the centroid; ``mixed``: alternately);
2. their LESS training features - Adam-preconditioned per-sample LoRA gradients, projected and
   unit length - are computed, and only theirs (:mod:`dataflex.selectors.less`);
3. a cluster's score is the cosine of its representatives' mean feature with the mean eval
   gradient feature;
4. samples are ranked by their cluster's score and then - inside a cluster - by the cosine of
   their own embedding with the mean embedding of the cluster's representatives (the original
   gave every member its cluster's score, so it took whole clusters in index order).

The cost of a selection is the eval gradients plus ``clusters × samples_per_cluster`` training
gradients instead of one per pool sample (``bench/selector_agreement.py`` measures it and the agreement
with full ``less``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from ..component import register
from ..scoring.embeddings import EmbeddingSource
from ..scoring.gradients import GradientFeaturizer, sharded_features
from ..scoring.optimizer_state import adam_moments
from ..scoring.projection import CountSketchProjector
from ..seeding import seeded_generator
from .base import ScoringParams, SelectionContext, SelectionResult, Selector, logger, nothing_supervised, take_ranked
from .less import eval_targets


@dataclass
class ClusterLessParams(ScoringParams):
    gradient_type: Literal["adam", "sgd"] = field(default="adam", metadata={"help": "Train feature: Adam direction or gradient."})
    proj_dim: int = field(default=8192, metadata={"help": "Dimension of the random projection of the gradients."})
    seed: int = field(default=42, metadata={"help": "Seed of the projection, the clustering and the representatives."})
    cluster_size: int = field(default=64, metadata={"help": "Pool rows per cluster: ⌈N / cluster_size⌉ clusters."})
    num_clusters: int | None = field(default=None, metadata={"help": "Number of clusters (overrides cluster_size)."})
    samples_per_cluster: int = field(default=4, metadata={"help": "Representatives per cluster whose gradients are computed."})
    clustering_method: Literal["kmeans", "spherical"] = field(
        default="kmeans", metadata={"help": "kmeans (Euclidean Lloyd) or spherical (cosine) k-means."})
    clustering_max_iter: int = field(default=10, metadata={"help": "Lloyd iterations (>= 1)."})
    clustering_batch_size: int = field(default=8, metadata={"help": "Rows per forward when embedding the pool."})
    representative_strategy: Literal["random", "nearest", "farthest", "mixed"] = field(
        default="random", metadata={"help": "How representatives are chosen in a cluster."})
    eval_aggregate: Literal["mean", "task_max"] = field(
        default="mean", metadata={"help": "mean: one eval target over all eval rows; task_max: one per eval dataset, "
                                          "a cluster scores its best (as less; needs eval_on_each_dataset: true)."})
    embedding_model_name_or_path: str | None = field(
        default=None, metadata={"help": "A frozen HF model to embed with; unset: the training model."})
    embedding_model_dtype: Literal["auto", "float32", "float16", "bfloat16"] = field(default="auto", metadata={
        "help": "dtype of the embedding model."})
    embedding_layer: int = field(default=-1, metadata={"help": "Hidden state to pool (-1: the last layer)."})

    inert = {"save_interval": "the original's interval for flushing gradient files; no gradient is stored here"}

    def check(self) -> None:
        super().check()
        for key in ("proj_dim", "cluster_size", "samples_per_cluster", "clustering_max_iter", "clustering_batch_size"):
            if getattr(self, key) < 1:
                self.fail(key, "an integer >= 1")
        if self.num_clusters is not None and self.num_clusters < 1:
            self.fail("num_clusters", "an integer >= 1, or null")


def kmeans(points: torch.Tensor, k: int, iters: int, seed: int, spherical: bool = False, chunk: int = 4096
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(assignment [N], centroids [k, D])``: seeded k-means++ init, then Lloyd; empty clusters re-seeded."""
    x = points.double()
    n = len(x)
    k = min(k, n)
    gen = seeded_generator(seed, "kmeans")

    def distances(c: torch.Tensor) -> torch.Tensor:
        out = []
        for start in range(0, n, chunk):
            block = x[start:start + chunk]
            if spherical:
                out.append(1 - block @ c.T)
            else:
                out.append(torch.cdist(block, c).square())
        return torch.cat(out)

    first = int(torch.randint(n, (1,), generator=gen))
    centroids = x[first:first + 1].clone()
    nearest = distances(centroids)[:, 0]
    for _ in range(1, k):  # k-means++: the next centroid with probability proportional to d²
        weights = nearest.clamp(min=0)
        pick = int(torch.multinomial(weights, 1, generator=gen)) if float(weights.sum()) > 0 else \
            int(torch.randint(n, (1,), generator=gen))
        centroids = torch.cat([centroids, x[pick:pick + 1]])
        nearest = torch.minimum(nearest, distances(centroids[-1:])[:, 0])
    assign = distances(centroids).argmin(dim=1)
    for _ in range(iters):
        for c in range(k):
            members = assign == c
            if members.any():
                centroids[c] = x[members].mean(dim=0)
            else:  # re-seed an empty cluster at the point farthest from its centroid
                d = distances(centroids).gather(1, assign[:, None])[:, 0]
                centroids[c] = x[int(d.argmax())]
            if spherical:
                centroids[c] = centroids[c] / centroids[c].norm().clamp(min=1e-12)
        new = distances(centroids).argmin(dim=1)
        if torch.equal(new, assign):
            break
        assign = new
    return assign, centroids


def representatives(assign: torch.Tensor, points: torch.Tensor, centroids: torch.Tensor, per_cluster: int,
                    strategy: str, gen: torch.Generator) -> list[int]:
    """Up to ``per_cluster`` member rows of every cluster, by ``strategy``."""
    out: list[int] = []
    for c in range(len(centroids)):
        members = (assign == c).nonzero().flatten()
        if len(members) == 0:
            continue
        d = (points[members].double() - centroids[c]).norm(dim=1)
        if strategy == "random":
            chosen = members[torch.randperm(len(members), generator=gen)[:per_cluster]]
        else:
            near_first = members[torch.argsort(d, stable=True)]
            if strategy == "nearest":
                chosen = near_first[:per_cluster]
            elif strategy == "farthest":
                chosen = near_first.flip(0)[:per_cluster]
            else:  # mixed: nearest, farthest, second nearest, second farthest, ...
                far_first = near_first.flip(0)
                mixed = [int(near_first[i // 2]) if i % 2 == 0 else int(far_first[i // 2])
                         for i in range(len(members))]
                chosen = torch.tensor(list(dict.fromkeys(mixed))[:per_cluster])
        out.extend(int(i) for i in chosen)
    return out


@register
class ClusterLessSelector(Selector):
    name = "cluster_less"
    Params = ClusterLessParams
    needs_eval = True
    supported_finetuning = ("lora",)
    summary = "LESS on clusters of the pool: gradients of a few representatives per cluster"

    def __init__(self, params: ClusterLessParams):
        super().__init__(params)
        self.projector = CountSketchProjector(params.proj_dim, params.seed)
        self.source = EmbeddingSource(params.embedding_model_name_or_path, params.embedding_layer,
                                      params.embedding_model_dtype, params.clustering_batch_size, params.cache_dir)
        self.clusters: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # assign, centroids, points

    def clustering(self, ctx: SelectionContext) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.clusters is None:
            p = self.params
            points = self.source.embed(ctx, ctx.train_dataset, "the training pool for clustering", fresh=False)
            points = torch.nan_to_num(points)
            k = p.num_clusters or math.ceil(len(points) / p.cluster_size)
            assign, centroids = kmeans(points, k, p.clustering_max_iter, p.seed, p.clustering_method == "spherical")
            self.clusters = (assign, centroids, points)
            if ctx.rank == 0:
                sizes = torch.bincount(assign, minlength=len(centroids))
                logger.info("[DataFlex] cluster_less: %d clusters of %d rows (%s), sizes %d-%d", len(centroids),
                            len(points), p.clustering_method, int(sizes.min()), int(sizes.max()))
        return self.clusters

    def select(self, ctx: SelectionContext) -> SelectionResult:
        p = self.params
        engine = ctx.scorer
        model = engine.model
        if ctx.eval_dataset is None or len(ctx.eval_dataset) == 0:
            raise ValueError("selector 'cluster_less' needs a non-empty eval_dataset")
        assign, centroids, points = self.clustering(ctx)
        reps = representatives(assign, points, centroids, p.samples_per_cluster, p.representative_strategy,
                               seeded_generator(p.seed, "representatives", ctx.selection))
        plain = GradientFeaturizer(model, self.projector)
        eval_feats = sharded_features(engine, ctx.eval_dataset, range(len(ctx.eval_dataset)), p.scoring_batch_size,
                                      plain, desc="cluster_less eval gradients")
        target, n_eval = eval_targets(eval_feats, ctx.eval_groups, p.eval_aggregate, self.name)
        target = target.double()  # [G, proj_dim]
        moments = None
        gradient_type = p.gradient_type
        if gradient_type == "adam":
            with ctx.agreement.section("cluster_less: gathering Adam moments"):
                moments, reason = adam_moments(ctx.optimizer, model, plain.param_names, engine.device)
            if moments is None:
                gradient_type = "sgd"
                if ctx.rank == 0:
                    logger.warning("[DataFlex] cluster_less: %s; plain gradients this selection", reason)
        feats = sharded_features(engine, ctx.train_dataset, reps, p.scoring_batch_size,
                                 GradientFeaturizer(model, self.projector, moments),
                                 desc="cluster_less representative gradients").double()
        rep_cluster = assign[torch.tensor(reps)]
        k = len(centroids)
        cluster_score = torch.full((k,), float("nan"), dtype=torch.float64)
        rep_embedding = torch.zeros(k, points.shape[1], dtype=torch.float64)
        for c in range(k):
            rows = (rep_cluster == c) & ~torch.isnan(feats[:, 0])
            if rows.any():
                mean = feats[rows].mean(dim=0)
                cluster_score[c] = float((target @ mean).max() / mean.norm().clamp(min=1e-30))
                members = torch.tensor(reps)[rep_cluster == c]
                rep_embedding[c] = points[members].double().mean(dim=0)
        rep_embedding = rep_embedding / rep_embedding.norm(dim=1, keepdim=True).clamp(min=1e-30)
        inner = (points.double() * rep_embedding[assign]).sum(dim=1)  # each sample vs its cluster's representatives
        score = cluster_score[assign]
        ranked = [i for i in range(len(points)) if not math.isnan(float(score[i]))]
        if not ranked:
            raise nothing_supervised()
        ranked.sort(key=lambda i: (-float(score[i]), -float(inner[i]), i))
        positions, repeated = take_ranked(len(ranked), ctx.num_samples, "cluster_less", ctx.rank)
        picks = [ranked[r] for r in positions]
        if ctx.rank == 0:
            best = float(torch.nan_to_num(cluster_score, nan=-2.0).max())
            logger.info("[DataFlex] cluster_less: %d representatives of %d clusters (%s, %s); best cluster score "
                        "%.4f", len(reps), k, p.representative_strategy, gradient_type, best)
        return SelectionResult(
            picks,
            per_sample={"cluster_score": [float(score[i]) for i in picks], "cluster": [int(assign[i]) for i in picks],
                        "within_cluster": [float(inner[i]) for i in picks]},
            summary={"clusters": k, "representatives": len(reps), "gradient_type": gradient_type,
                     "eval_samples": n_eval, "eval_aggregate": p.eval_aggregate, "repeated": repeated},
        )

    def state_dict(self) -> dict[str, Any]:
        return self.source.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.source.load_state_dict(state)
