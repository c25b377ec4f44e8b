"""The mixer interface (``train_type: dynamic_mix``).

The training datasets named in ``dataset: a,b,c`` are the *domains*. A mixer decides, at each
update, the proportions in which the coming rows are drawn from the domains, and optionally a
weight per domain for the training loss (DoReMi's proxy objective); it never touches rows or
the model itself. What it may look at:

* :class:`DomainStats` - per-domain sums over every micro-batch and rank since the last update
  (summed over ranks before the mixer sees them, so every rank would decide alike);
* for mixers that measure the model on per-domain eval data (``dynamic_moe``), the scoring
  engine in :meth:`Mixer.prepare`, which runs on every rank before the decision.

:meth:`Mixer.update` runs on rank 0 only; its :class:`MixDecision` is broadcast.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, ClassVar, Sequence

import torch

from ..component import Component
from ..errors import ConfigError
from ..params import Params
from ..values import names

logger = logging.getLogger("dataflex")


@dataclass
class DomainStats:
    """Sums per domain since the last update: token losses, supervised tokens, excess losses, samples."""

    loss_sum: torch.Tensor
    tokens: torch.Tensor
    excess_sum: torch.Tensor
    samples: torch.Tensor

    @classmethod
    def zeros(cls, k: int) -> "DomainStats":
        return cls(*(torch.zeros(k, dtype=torch.float64) for _ in range(4)))

    def add(self, domains: torch.Tensor, loss_sums: torch.Tensor, tokens: torch.Tensor,
            excess_sums: torch.Tensor | None = None) -> None:
        """Add per-sample sums of one micro-batch (``domains`` [b] long)."""
        d = domains.detach().cpu().long()
        self.loss_sum.index_add_(0, d, loss_sums.detach().cpu().double())
        self.tokens.index_add_(0, d, tokens.detach().cpu().double())
        self.samples.index_add_(0, d, torch.ones(len(d), dtype=torch.float64))
        if excess_sums is not None:
            self.excess_sum.index_add_(0, d, excess_sums.detach().cpu().double())

    def flat(self) -> torch.Tensor:
        return torch.cat([self.loss_sum, self.tokens, self.excess_sum, self.samples])

    @classmethod
    def from_flat(cls, flat: torch.Tensor) -> "DomainStats":
        return cls(*(t.clone() for t in flat.double().chunk(4)))

    def mean_loss(self) -> list[float | None]:
        return [float(s / n) if n > 0 else None for s, n in zip(self.loss_sum.tolist(), self.tokens.tolist())]

    def to_dict(self) -> dict[str, list[float]]:
        return {k: getattr(self, k).tolist() for k in ("loss_sum", "tokens", "excess_sum", "samples")}

    @classmethod
    def from_dict(cls, d: dict[str, list[float]]) -> "DomainStats":
        return cls(*(torch.tensor(d[k], dtype=torch.float64) for k in ("loss_sum", "tokens", "excess_sum", "samples")))


@dataclass
class MixContext:
    """Everything one mixture update may use."""

    step: int  # optimizer steps done
    update: int  # 0-based number of this update
    domains: list[str]
    sizes: list[int]  # rows per domain
    proportions: list[float]  # the sampling proportions in force until now
    stats: DomainStats  # since the last update, all ranks and micro-batches
    steps_since: int  # optimizer steps the stats cover
    total_steps: int
    seed: int
    scorer: Any = None  # the scoring engine (prepare() only)
    eval_sets: list[Any] | None = None  # mixer_eval_dataset, one per domain
    rank: int = 0


@dataclass
class MixDecision:
    proportions: list[float]  # sampling proportions of the coming rows
    loss_weights: list[float] | None = None  # per-domain weights of the training loss (None: plain loss)
    summary: dict[str, Any] = field(default_factory=dict)


class Mixer(Component):
    """Base class. Subclasses set ``name`` and ``Params`` and implement :meth:`update`."""

    kind: ClassVar[str] = "mixers"
    Params: ClassVar[type[Params]] = Params
    granularity: ClassVar[str] = "sample"  # "sample": mixed rows; "micro_batch": one domain per micro-batch
    every_step: ClassVar[bool] = False  # update after every optimizer step (ignores update_step)
    # what the mixer's decision acts on: "rows" (its proportions choose the coming rows: static, random,
    # odm) or "loss" (it weighs each domain in the training loss and keeps the proportions it was given:
    # doremi). A pipeline runs a "loss" mixer as a loss-space stage (docs/pipelines.md, rule 3).
    acts_on: ClassVar[str] = "rows"

    def check_domains(self, cfg: dict[str, Any], domains: Sequence[str]) -> None:
        """Checks against the training datasets (the domains): a mixer that measures the model on each
        domain ("router") needs one ``mixer_eval_dataset`` per domain."""
        evals = names(cfg.get("mixer_eval_dataset"))
        if "router" in self.needs:
            if len(evals) != len(domains):
                raise ConfigError(f"mixer_eval_dataset: mixer '{self.name}' needs one eval dataset per training "
                                  f"dataset ({len(domains)}: {', '.join(domains)}), got {len(evals)}")
        elif cfg.get("mixer_eval_dataset"):
            logger.warning("[DataFlex] mixer_eval_dataset is only used by mixers that measure the model per domain "
                           "(dynamic_moe); mixer '%s' ignores it", self.name)

    def setup(self, domains: Sequence[str], sizes: Sequence[int], initial: Sequence[float], total_steps: int,
              warmup_step: int) -> None:
        """Called once on every rank before training, with the starting proportions."""
        self.domains = list(domains)

    def own_start(self, domains: Sequence[str]) -> list[float] | None:
        """The mixer's own starting proportions (a param), or None. They hold from step 0 when the YAML
        sets no ``init_mixture_proportions``; checked against the number of domains here."""
        return None

    def initial_loss_weights(self) -> list[float] | None:
        """Per-domain loss weights before the first update (None: plain loss)."""
        return None

    def prepare(self, ctx: MixContext) -> None:
        """Every rank, before :meth:`update` (collective work, e.g. measuring the model)."""

    def update(self, ctx: MixContext) -> MixDecision:  # pragma: no cover - interface
        raise NotImplementedError

    def finish(self, total_steps: int) -> None:
        """Training ended after ``total_steps`` steps (rank 0, before :meth:`outputs`)."""

    def outputs(self, output_dir: str) -> list[str]:
        """Files written at the end of training (rank 0), e.g. DoReMi's averaged weights."""
        return []


def normalise(values: Sequence[float]) -> list[float]:
    total = float(sum(values))
    return [float(v) / total for v in values]


def starting_proportions(rule: str, sizes: Sequence[int], init: Sequence[float] | None, domains: Sequence[str],
                         mixer: "Mixer | None") -> tuple[list[float], str]:
    """The proportions in force from step 0, and where they come from (for the log).

    ``stratified`` and ``uniform`` rules fix them; under ``mixture`` the YAML's
    ``init_mixture_proportions`` wins, then the mixer's own starting proportions, then equal shares.
    """
    k = len(sizes)
    if rule == "stratified":
        return [s / sum(sizes) for s in sizes], "by dataset size (mixture_sample_rule: stratified)"
    if rule == "uniform":
        return [1.0 / k] * k, "equal (mixture_sample_rule: uniform)"
    if init is not None:
        return [float(x) for x in init], "init_mixture_proportions"
    own = mixer.own_start(domains) if mixer is not None else None
    if own is not None:
        return list(own), f"mixer '{mixer.name}' starting proportions (init_mixture_proportions unset)"
    return [1.0 / k] * k, "uniform (init_mixture_proportions unset)"
