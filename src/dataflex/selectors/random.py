"""``random``: uniform draw from the training set - the baseline every other selector must beat."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..component import register
from ..params import Params
from ..seeding import seeded_generator
from .base import SelectionContext, SelectionResult, Selector, uniform_draw


@dataclass
class RandomParams(Params):
    seed: int | None = field(
        default=None,
        metadata={"help": "Seed of the draws (with the selection number). Unset: the run's seed."},
    )
    replacement: bool = field(
        default=False,
        metadata={"help": "Draw with replacement. Without it, a request larger than the set switches to it (warning)."},
    )


@register
class RandomSelector(Selector):
    name = "random"
    Params = RandomParams
    summary = "uniform draw without replacement (the baseline)"

    def select(self, ctx: SelectionContext) -> SelectionResult:
        gen = ctx.generator if self.params.seed is None else seeded_generator(self.params.seed, "select", ctx.selection)
        indices, replaced = uniform_draw(ctx.train_size, ctx.num_samples, gen, self.params.replacement)
        return SelectionResult(indices, summary={"replacement": replaced})
