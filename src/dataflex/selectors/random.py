"""``random``: uniform draw from the training set - the baseline every other selector must beat."""

from __future__ import annotations

from dataclasses import dataclass, field

from .base import SelectionContext, SelectionResult, Selector, register, uniform_draw
from .params import Params


@dataclass
class RandomParams(Params):
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
        indices, replaced = uniform_draw(ctx.train_size, ctx.num_samples, ctx.generator, self.params.replacement)
        return SelectionResult(indices, {"replacement": replaced})
