"""``near``: the training samples nearest to the eval set, taken in turns over the eval samples.

Every eval sample (query) ranks the training pool by the cosine similarity of their embeddings
(:mod:`dataflex.scoring.embeddings`: by default the training model's own mean-pooled hidden
state; or a frozen ``embedding_model_name_or_path``). Picks go round-robin over the queries:
every query's 1st neighbour, then every query's 2nd, ..., skipping rows already taken, until
``num_samples``; when fewer distinct neighbours exist the sequence is repeated from the start,
with a warning.

``refresh: true`` embeds again with the current model at every selection; ``false`` embeds once
(the original reads a precomputed neighbour list, so its "dynamic" selection never changes -
``indices_path`` still accepts such a ``.npy`` of neighbour ids, one row per query, checked
against the training set before training).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from ..component import register
from ..errors import ConfigError
from ..scoring.embeddings import EmbeddingSource
from ..scoring.neighbours import top_k
from .base import ScoringParams, SelectionContext, SelectionResult, Selector, logger


@dataclass
class NearParams(ScoringParams):
    indices_path: str | None = field(
        default=None, metadata={"help": "A .npy of neighbour ids [queries, K] (the original's offline list); "
                                        "unset: neighbours from embeddings."})
    refresh: bool = field(default=True, metadata={"help": "Embed again with the current model at every selection."})
    neighbours: int = field(default=1000, metadata={"help": "Neighbours kept per eval sample (>= 1)."})
    embedding_model_name_or_path: str | None = field(
        default=None, metadata={"help": "A frozen HF model to embed with; unset: the training model."})
    embedding_model_dtype: Literal["auto", "float32", "float16", "bfloat16"] = field(
        default="auto", metadata={"help": "dtype of the embedding model."})
    embedding_layer: int = field(default=-1, metadata={"help": "Hidden state to pool (-1: the last layer)."})
    search: Literal["torch", "faiss"] = field(
        default="torch", metadata={"help": "Exact cosine search: chunked torch, or faiss (if installed)."})

    def check(self) -> None:
        super().check()
        self.refuse_candidate_pool()
        if self.neighbours < 1:
            self.fail("neighbours", "an integer >= 1")
        if self.indices_path is not None:
            load_neighbour_ids(self.indices_path, self._component())
        if self.search == "faiss":
            try:
                import faiss  # noqa: F401
            except ImportError:
                self.fail("search", "torch, or faiss after pip install faiss-cpu")


def load_neighbour_ids(path: str, component: str) -> torch.Tensor:
    import numpy as np

    key = f"component '{component}': param 'indices_path'"
    try:
        data = np.load(path)
    except (OSError, ValueError) as err:
        raise ConfigError(f"{key} = '{path}' cannot be read as a .npy file ({err})") from None
    if data.ndim != 2 or not np.issubdtype(data.dtype, np.integer):
        raise ConfigError(f"{key} = '{path}' holds a {data.ndim}-D {data.dtype} array; allowed: a 2-D integer array "
                          "[queries, neighbours]")
    return torch.from_numpy(data.astype("int64"))


def round_robin(neighbours: torch.Tensor, n: int) -> tuple[list[int], list[int], bool]:
    """``(picks, rank of each pick among its query's neighbours, repeated)`` going over ``neighbours`` [M, K]
    column by column (every query's 1st, then 2nd, ...), skipping rows already taken and ids < 0."""
    order: list[int] = []
    ranks: list[int] = []
    seen: set[int] = set()
    for k in range(neighbours.shape[1]):
        for row in neighbours[:, k].tolist():
            if row >= 0 and row not in seen:
                seen.add(row)
                order.append(row)
                ranks.append(k)
                if len(order) == n:
                    return order, ranks, False
    if not order:
        raise ValueError("no eval sample has a training neighbour")
    return [order[i % len(order)] for i in range(n)], [ranks[i % len(order)] for i in range(n)], True


@register
class NearSelector(Selector):
    name = "near"
    Params = NearParams
    needs_eval = True
    summary = "nearest training neighbours of the eval samples, round-robin over the eval samples"

    def __init__(self, params: NearParams):
        super().__init__(params)
        self.fixed = load_neighbour_ids(params.indices_path, params._component()) if params.indices_path else None
        self.source = EmbeddingSource(params.embedding_model_name_or_path, params.embedding_layer,
                                      params.embedding_model_dtype, params.scoring_batch_size, params.cache_dir)
        self.neighbour_ids: torch.Tensor | None = None

    def check_data(self, train_size: int, eval_size: int | None) -> None:
        if self.fixed is not None:
            bad = self.fixed[(self.fixed < 0) | (self.fixed >= train_size)]
            if len(bad):
                raise ConfigError(f"component '{self.params._component()}': param 'indices_path' = "
                                  f"'{self.params.indices_path}' names row {int(bad[0])}, outside the training set "
                                  f"[0, {train_size})")

    def neighbours_of(self, ctx: SelectionContext) -> torch.Tensor:
        p = self.params
        if self.fixed is not None:
            return self.fixed
        if self.neighbour_ids is not None and not p.refresh:
            return self.neighbour_ids
        train, queries = self.source.pool_and_queries(ctx, "near", p.refresh)
        if len(queries) == 0:
            raise ValueError("no eval sample has a token to embed (check cutoff_len and eval_dataset)")
        _, ids = top_k(queries, train, p.neighbours, backend=p.search)
        self.neighbour_ids = ids
        return ids

    def select(self, ctx: SelectionContext) -> SelectionResult:
        ids = self.neighbours_of(ctx)
        picks, ranks, repeated = round_robin(ids, ctx.num_samples)
        if repeated and ctx.rank == 0:
            logger.warning("[DataFlex] near: only %d distinct neighbours for %d samples: the list is repeated",
                           len(set(picks)), ctx.num_samples)
        if ctx.rank == 0:
            logger.info("[DataFlex] near: %d queries x %d neighbours (%s); deepest neighbour used: %d",
                        ids.shape[0], ids.shape[1], "indices_path" if self.fixed is not None else self.source.describe(),
                        max(ranks) + 1)
        return SelectionResult(picks, per_sample={"neighbour_rank": ranks},
                               summary={"queries": int(ids.shape[0]), "neighbours": int(ids.shape[1]),
                                        "repeated": repeated, "refreshed": self.fixed is None and self.params.refresh})

    def state_dict(self) -> dict[str, Any]:
        return self.source.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.source.load_state_dict(state)
