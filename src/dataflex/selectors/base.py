"""The selector interface, the registry, and the draws shared by the sampling selectors.

A selector turns scores into indices and nothing else: it gets everything it needs in one
:class:`SelectionContext` and returns a :class:`SelectionResult`. Scoring (losses, gradients,
zeroth-order probes) lives in :mod:`dataflex.scoring`; selectors never import LLaMA-Factory.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from ..errors import ConfigError
from .params import Params

logger = logging.getLogger("dataflex")


@dataclass
class SelectionContext:
    """Everything one selection may use. Built by the trainer on every rank."""

    step: int  # optimizer steps done so far (the record is step_{step}.json)
    selection: int  # 0-based number of this selection over the whole run
    t: int  # 0-based number of this selection inside its cycle
    T: int  # selections per cycle (update_times)
    num_selections: int  # selections over the whole run
    num_samples: int  # how many indices to return (G x update_step, or fewer for a cut stretch)
    train_size: int
    generator: torch.Generator  # seeded from the run's seed and the selection number
    seed: int
    cache_dir: str
    rank: int = 0
    world_size: int = 1
    model: Any = None
    train_dataset: Any = None
    eval_dataset: Any = None
    collator: Any = None
    optimizer: Any = None
    learning_rate: float = 0.0
    device: Any = None
    scorer: Any = None  # dataflex.scoring engine bound to this model/collator (selectors that score)


@dataclass
class SelectionResult:
    """Chosen training-set indices and per-sample metrics aligned with them.

    ``metric`` maps a name to either a list aligned with ``indices`` (per-sample values) or a
    scalar / small summary. It is written to the selection record as is.
    """

    indices: list[int]
    metric: dict[str, Any] = field(default_factory=dict)


class Selector:
    """Base class. Subclasses set ``name`` and ``Params`` and implement :meth:`select`."""

    name: ClassVar[str] = ""
    Params: ClassVar[type[Params]] = Params
    needs_eval: ClassVar[bool] = False  # requires `eval_dataset` in the YAML
    supported_finetuning: ClassVar[tuple[str, ...] | None] = None  # None: any finetuning_type
    summary: ClassVar[str] = ""

    def __init__(self, params: Params):
        self.params = params

    def select(self, ctx: SelectionContext) -> SelectionResult:  # pragma: no cover - interface
        raise NotImplementedError

    # State that must survive a restart (e.g. delta_loss's baseline losses). JSON-serialisable.
    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


SELECTORS: dict[str, type[Selector]] = {}


def register(cls: type[Selector]) -> type[Selector]:
    if not cls.name:
        raise TypeError(f"{cls.__name__} has no name")
    SELECTORS[cls.name] = cls
    return cls


def get_selector_class(name: str, component: str | None = None) -> type[Selector]:
    if name not in SELECTORS:
        where = f"component '{component}': " if component else ""
        raise ConfigError(f"{where}unknown selector name '{name}'; available: {', '.join(sorted(SELECTORS))}")
    return SELECTORS[name]


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

    def check(self) -> None:
        if self.scoring_batch_size < 1:
            self.fail("scoring_batch_size", "an integer >= 1")
        pool = self.candidate_pool
        if pool is not None:
            if isinstance(pool, int) and pool < 1:
                self.fail("candidate_pool", "an integer >= 1 or a fraction in (0, 1]")
            if isinstance(pool, float) and not 0.0 < pool <= 1.0:
                self.fail("candidate_pool", "an integer >= 1 or a fraction in (0, 1]")


def candidate_indices(ctx: SelectionContext, pool: int | float | None) -> list[int]:
    """The training indices to score at this selection: all, or a seeded random pool."""
    n = ctx.train_size
    if pool is None:
        return list(range(n))
    size = pool if isinstance(pool, int) else max(1, round(pool * n))
    if size >= n:
        return list(range(n))
    return sorted(torch.randperm(n, generator=ctx.generator)[:size].tolist())


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
