"""The weighter interface (``train_type: dynamic_weight``).

A weighter turns per-sample signals of one optimizer step into per-sample loss weights and
nothing else. The step trains on

    L = sum_i w_i * sum_t l_{i,t} / sum_i n_i

over the G samples of the global batch (all micro-batches, all ranks; ``n_i`` supervised tokens
of sample i, ``l_{i,t}`` their token losses), so weights 1 give exactly the loss plain
LLaMA-Factory trains on. The core rescales what :meth:`Weighter.weights` returns to mean 1
over the step's samples; weights carry no gradient.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch

from ..component import Component
from ..params import Params


@dataclass
class WeightParams(Params):
    """Parameters every weighter has."""

    scope: Literal["global_batch", "micro_batch"] = field(
        default="global_batch",
        metadata={"help": "global_batch: weights over all G samples of the step (one extra no-grad forward of the "
                          "step's samples before its first backward); micro_batch: over the samples of each "
                          "micro-batch on all ranks, from the training forward itself (no extra forward)."},
    )


@dataclass
class WeightSignals:
    """What a weighter sees of one step's samples (every rank's, in step order: micro-batch, then rank)."""

    step: int
    indices: list[int]  # training-set rows
    tokens: torch.Tensor  # [n] supervised tokens per sample
    losses: torch.Tensor | None = None  # [n] float64 mean token loss (NaN: no supervised token)
    embeddings: torch.Tensor | None = None  # [n, hidden] float32, L2-normalised (NaN rows: no token)


@dataclass
class WeightContext:
    """What :meth:`Weighter.prepare` may use, on every rank, before the step's signals are gathered."""

    step: int
    scorer: Any  # dataflex.scoring.engine.ScoringEngine (the current model is scorer.model)
    eval_dataset: Any = None


class Weighter(Component):
    """Base class. Subclasses set ``name``, ``Params`` and ``needs`` and implement :meth:`weights`."""

    kind: ClassVar[str] = "weighters"
    Params: ClassVar[type[Params]] = WeightParams
    needs: ClassVar[frozenset[str]] = frozenset()  # signals: "losses", "embeddings"
    embedding_layer: int = -1  # which hidden state the "embeddings" signal pools
    embedding_pooling: str = "mean"  # how: "mean" over the row's tokens, or its "last" token

    def prepare(self, ctx: WeightContext) -> None:
        """Called on every rank at every weighted step before the signals are gathered (e.g. to refresh anchors)."""

    def weights(self, signals: WeightSignals) -> tuple[torch.Tensor, dict[str, Any]]:  # pragma: no cover
        """``(weights [n] >= 0, summary)`` for the step; runs on rank 0 only (numbers in summary are logged)."""
        raise NotImplementedError
