"""``static``: one score per row, computed once; rows consumed in score order, optionally paced.

The score is the row's token length, its mean token loss under the model at the moment of
scoring (step 0, or after ``warmup_step`` random-order steps), or a numeric dataset column (a
difficulty annotation). Every epoch then consumes the rows sorted by that score (ties in a
seeded random order that differs per epoch).

With ``pacing`` (a competence-based curriculum, Platanios et al. 2019) a step does not walk the
order: it draws its rows uniformly from the easiest share c(t) of the ordered rows, t steps after
the warm-up, with c0 the starting share and T = ``pacing_steps``:

    root    c(t) = min(1, sqrt(t (1 - c0²) / T + c0²))
    linear  c(t) = min(1, c0 + t (1 - c0) / T)
    step    c(t) = min(1, c0 + (1 - c0) floor(t · stages / T) / stages)

so rows can repeat and late rows are seen less; after T steps every row is available.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

from ..component import register
from ..errors import ConfigError
from ..scoring.engine import dataset_lengths
from .base import OrderResult, ReorderContext, Reorderer, ReorderParams, sort_rows

PACINGS = ("none", "root", "linear", "step")


@dataclass
class StaticParams(ReorderParams):
    score: Literal["length", "loss", "column"] = field(
        default="length",
        metadata={"help": "length: the row's tokens (prompt and answer); loss: its mean token loss under the model "
                          "when the curriculum starts; column: the numeric dataset column named by `column`."},
    )
    column: str | None = field(
        default=None, metadata={"help": "The dataset column holding each row's score (with score: column; sft only)."}
    )
    pacing: Literal["none", "root", "linear", "step"] = field(
        default="none",
        metadata={"help": "none: every row once per epoch, in score order; root / linear / step: a step draws from "
                          "the easiest share c(t) of the ordered rows, growing from c0 to 1 over pacing_steps."},
    )
    c0: float = field(default=0.1, metadata={"help": "Share of the ordered rows available at the curriculum's first "
                                                     "step, in (0, 1]."})
    pacing_steps: int | None = field(
        default=None, metadata={"help": "T: steps after the warm-up until every row is available (>= 1). Unset: "
                                        "half the steps after the warm-up."}
    )
    stages: int = field(default=4, metadata={"help": "pacing: step: how many equal increments take c from c0 to 1 "
                                                     "(>= 1)."})

    def check(self) -> None:
        super().check()
        if self.score == "column" and not self.column:
            self.fail("column", "the name of a numeric dataset column (required with score: column)")
        if self.column is not None and self.score != "column":
            self.fail("column", f"unset with score: {self.score} (a column is read only with score: column)")
        if not (math.isfinite(self.c0) and 0.0 < self.c0 <= 1.0):
            self.fail("c0", "a number in (0, 1]")
        if self.pacing_steps is not None and self.pacing_steps < 1:
            self.fail("pacing_steps", "an integer >= 1, or unset")
        if self.stages < 1:
            self.fail("stages", "an integer >= 1")


def competence(pacing: str, t: int, steps: int, c0: float, stages: int = 4) -> float:
    """The share of the ordered rows available ``t`` steps into a curriculum of ``steps`` steps."""
    if pacing == "none":
        return 1.0
    x = max(t, 0) / steps
    if pacing == "root":
        c = math.sqrt(x * (1.0 - c0 * c0) + c0 * c0)
    elif pacing == "linear":
        c = c0 + x * (1.0 - c0)
    elif pacing == "step":
        c = c0 + (1.0 - c0) * math.floor(x * stages + 1e-9) / stages
    else:
        raise ValueError(f"unknown pacing '{pacing}'; allowed: {', '.join(PACINGS)}")
    return min(1.0, c)


@register
class StaticReorderer(Reorderer):
    name = "static"
    Params = StaticParams
    summary = "order rows once by length, loss or a dataset column (ascending/descending), optionally paced"

    def __init__(self, params: StaticParams):
        super().__init__(params)
        self.scores: list[float | None] | None = None  # one per training row, once computed
        self.scored_at: int | None = None

    @property
    def column(self) -> str | None:
        return self.params.column if self.params.score == "column" else None

    def check_config(self, cfg: dict[str, Any], spec: Any) -> None:
        super().check_config(cfg, spec)
        if self.params.score == "column" and cfg.get("stage", "sft") == "pt":
            raise ConfigError(f"component '{spec.key}': param 'score' = 'column' cannot be used with stage: pt "
                              "(pretraining rows are blocks of cutoff_len tokens, not dataset rows); allowed: "
                              "length or loss")

    def row_scores(self, ctx: ReorderContext) -> list[float | None]:
        p = self.params
        if p.score == "length":
            return [float(n) for n in dataset_lengths(ctx.train_dataset)]
        if p.score == "column":
            if ctx.column is None:
                raise ValueError(f"column '{p.column}' was not read with the training data")
            return [float(v) for v in ctx.column]
        losses = ctx.scorer.losses(ctx.train_dataset, range(ctx.train_size), p.scoring_batch_size,
                                   desc="static curriculum: scoring losses")
        return [None if math.isnan(v) else float(v) for v in losses.tolist()]

    def order(self, ctx: ReorderContext) -> OrderResult:
        if self.scores is None:
            self.scores = self.row_scores(ctx)
            self.scored_at = ctx.step
        if len(self.scores) != ctx.train_size:
            raise ValueError(f"{len(self.scores)} stored scores for a training set of {ctx.train_size} rows")
        mine = [self.scores[i] for i in ctx.rows]
        rows = sort_rows(ctx.rows, mine, self.params.order == "descending", ctx.generator)
        return OrderResult(rows, [self.scores[i] for i in rows], {"score": self.params.score,
                                                                  "scored_at": self.scored_at})

    def pacing_length(self, steps_after_warmup: int) -> int:
        return self.params.pacing_steps or max(1, steps_after_warmup // 2)

    def competence(self, t: int, steps: int) -> float | None:
        p = self.params
        if p.pacing == "none":
            return None
        return competence(p.pacing, t, self.pacing_length(steps), p.c0, p.stages)

    def state_dict(self) -> dict[str, Any]:
        return {"scores": self.scores, "scored_at": self.scored_at}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.scores = state.get("scores")
        self.scored_at = state.get("scored_at")
