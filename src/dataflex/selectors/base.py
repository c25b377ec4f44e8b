"""The selector interface and the draws shared by the sampling selectors.

A selector turns scores into indices and nothing else: it gets everything it needs in one
:class:`SelectionContext` and returns a :class:`SelectionResult`. Scoring (losses, gradients,
embeddings, zeroth-order probes) lives in :mod:`dataflex.scoring`; selectors never import
LLaMA-Factory.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from ..component import Component
from ..core.sampling import pool_positions
from ..params import Params

logger = logging.getLogger("dataflex")


@dataclass
class SelectionContext:
    """Everything one selection may use. Built by the trainer on every rank."""

    step: int  # optimizer steps done so far (the record is step_{step}.json)
    selection: int  # 0-based number of this selection over the whole run
    num_selections: int  # selections over the whole run
    num_samples: int  # how many indices to return (G x update_step, or fewer for a cut stretch)
    train_dataset: Any
    scorer: Any  # dataflex.scoring.engine.ScoringEngine: the model is scorer.model
    generator: torch.Generator  # seeded from the run's seed and the selection number
    records_dir: str = "."  # this run's record folder (for a selector's side files)
    eval_dataset: Any = None
    optimizer: Any = None
    learning_rate: float = 0.0  # η of the coming step (the LoRA-A parameter group's, see docs/selectors/less.md)
    tokenizer: Any = None  # the training tokenizer (to decode rows, e.g. for a reward model or an embedding model)
    cache_dir: str = "."  # the run's cache_dir: files shared by runs, keyed by content (embeddings)
    # (name, start, end) of every eval dataset inside eval_dataset when several were given as separate
    # sets (LLaMA-Factory's eval_on_each_dataset); None: one eval set
    eval_groups: list[tuple[str, int, int]] | None = None

    @property
    def train_size(self) -> int:
        return len(self.train_dataset)

    @property
    def rank(self) -> int:
        return self.scorer.rank

    @property
    def world_size(self) -> int:
        return self.scorer.world_size

    @property
    def agreement(self) -> Any:
        return self.scorer.agreement


@dataclass
class SelectionResult:
    """Chosen training-set indices, per-sample values aligned with them, and summaries.

    ``per_sample`` maps a name to a list with one value per index: when the indices are put in
    their consumption order, these lists are reordered with them. ``summary`` holds everything
    else (thresholds, a window, counts) and is never reordered.
    """

    indices: list[int]
    per_sample: dict[str, list[Any]] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)

    def check(self, n: int, train_size: int) -> None:
        if len(self.indices) != n:
            raise RuntimeError(f"selector returned {len(self.indices)} indices, expected {n}")
        bad = [i for i in self.indices if not (isinstance(i, int) and not isinstance(i, bool) and 0 <= i < train_size)]
        if bad:
            raise RuntimeError(f"selector returned index {bad[0]!r} outside the training set [0, {train_size})")
        for key, values in self.per_sample.items():
            if len(values) != n:
                raise RuntimeError(f"selector's per-sample '{key}' has {len(values)} values for {n} indices")

    def reordered(self, perm: list[int]) -> "SelectionResult":
        """The same selection with indices and per-sample values in the order ``perm``."""
        return SelectionResult([self.indices[p] for p in perm],
                               {k: [v[p] for p in perm] for k, v in self.per_sample.items()}, dict(self.summary))


class Selector(Component):
    """Base class. Subclasses set ``name`` and ``Params`` and implement :meth:`select`."""

    kind: ClassVar[str] = "selectors"

    def select(self, ctx: SelectionContext) -> SelectionResult:  # pragma: no cover - interface
        raise NotImplementedError


def uniform_draw(n: int, k: int, generator: torch.Generator, replacement: bool = False) -> tuple[list[int], bool]:
    """``k`` indices out of ``range(n)``, uniformly. Returns ``(indices, used_replacement)``.

    Without replacement unless asked for, or unless ``k > n`` (then with replacement, and a warning).
    """
    if n <= 0:
        raise ValueError("cannot draw from an empty training set")
    if replacement or k > n:
        if not replacement:
            logger.warning("asked for %d samples from a pool of %d: drawing with replacement", k, n)
        return torch.randint(n, (k,), generator=generator).tolist(), True
    return torch.randperm(n, generator=generator)[:k].tolist(), False


def weighted_draw(
    weights: torch.Tensor, k: int, generator: torch.Generator, replacement: bool = False
) -> tuple[list[int], bool]:
    """``k`` positions drawn with probability proportional to ``weights`` (>= 0).

    Positions with weight 0 are never drawn. Without replacement unless asked for, or unless
    fewer than ``k`` positions have a positive weight (then with replacement, and a warning).
    """
    weights = weights.double()
    valid = int((weights > 0).sum())
    if valid == 0:
        raise ValueError("no sample has a positive sampling weight")
    if not replacement and k > valid:
        logger.warning("asked for %d samples but only %d are eligible: drawing with replacement", k, valid)
        replacement = True
    idx = torch.multinomial(weights, k, replacement=replacement, generator=generator)
    return idx.tolist(), replacement


@dataclass
class ScoringParams(Params):
    """Parameters shared by selectors that score samples with the model."""

    scoring_batch_size: int = field(
        default=16, metadata={"help": "Samples per scoring forward pass (grouped by length, per rank)."}
    )
    candidate_pool: int | float | None = field(
        default=None,
        metadata={"help": "Score only a fresh random pool per selection: a count (int) or a fraction of the "
                          "training set in (0, 1]. Unset: the whole set."},
    )
    score_batch_size: int | None = field(
        default=None, metadata={"help": "The original DataFlex's name for scoring_batch_size; when set, it is "
                                         "the scoring batch."})
    random_share: float = field(
        default=0.0,
        metadata={"help": "Share in [0, 1) of every selection drawn uniformly at random from the rows the selector "
                          "did not pick: keeps the other tasks in view when a selector homes in on one. 0: off."},
    )

    def check(self) -> None:
        if self.score_batch_size is not None:
            if self.score_batch_size < 1:
                self.fail("score_batch_size", "an integer >= 1")
            self.scoring_batch_size = self.score_batch_size
        if self.scoring_batch_size < 1:
            self.fail("scoring_batch_size", "an integer >= 1")
        if not 0.0 <= self.random_share < 1.0:
            self.fail("random_share", "a number in [0, 1), e.g. 0.25")
        self.check_count_or_fraction("candidate_pool")

    def refuse_candidate_pool(self) -> None:
        """For a selector that embeds and searches the whole training set: a candidate pool would be ignored."""
        if self.candidate_pool is not None:
            self.fail("candidate_pool", "unset (this selector embeds and searches the whole training set at every "
                                        "selection)")


def candidate_indices(ctx: SelectionContext, pool: int | float | None) -> list[int]:
    """The training indices to score at this selection: all, or a seeded random pool."""
    return pool_positions(ctx.train_size, pool, ctx.generator)


def pool_scores(pool: list[int], scores: torch.Tensor) -> dict[str, list]:
    """Every scored row and its score, for a record's summary (``record_scores: true``); NaN becomes ``None``."""
    return {"indices": list(pool), "values": [None if v != v else round(float(v), 6) for v in scores.tolist()]}


def nothing_supervised(split: str = "train") -> ValueError:
    """The error for a selection where no sample of ``split`` ("train" / "eval") has a supervised token."""
    which, key = ("eval", "eval_dataset") if split == "eval" else ("training", "dataset")
    return ValueError(f"no {which} sample has a supervised token (check cutoff_len and {key})")


def take_ranked(ranking_size: int, n: int, selector: str, rank: int = 0) -> tuple[list[int], bool]:
    """Positions in a best-first ranking of ``ranking_size`` samples to take for ``n`` picks.

    The top ``n``; when the ranking is shorter than ``n`` it is repeated from the top, with a
    warning. Returns ``(positions, repeated)``.
    """
    repeated = n > ranking_size
    if repeated and rank == 0:
        logger.warning("[DataFlex] %s: asked for %d samples but only %d have a score: the ranking is repeated",
                       selector, n, ranking_size)
    return [k % ranking_size for k in range(n)], repeated


def sampling_probabilities(weights: torch.Tensor, temperature: float = 1.0, eps: float = 1e-12) -> torch.Tensor:
    """p_i = (w_i + eps)^(1/T) / sum_j (w_j + eps)^(1/T), over the entries with w_i > 0.

    Entries with weight 0 (no score) keep probability 0.
    """
    w = weights.double()
    powered = torch.where(w > 0, (w + eps) ** (1.0 / temperature), torch.zeros_like(w))
    return powered / powered.sum()
