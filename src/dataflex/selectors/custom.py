"""``custom``: the template for your own selector - here, the first rows of the training set.

It returns rows 0, 1, 2, ... (wrapping around when a selection asks for more rows than there
are), like the original's example. To write your own, copy this file (docs/selectors/custom.md),
change ``name`` and ``select``, and either drop it into ``dataflex/selectors/`` or name it in
your components file as ``name: path/to/my_selector.py:MySelector`` - no fork of DataFlex needed.
A selector gets everything in the :class:`SelectionContext` (the scoring engine with the current
model, the datasets, the optimizer, a seeded generator) and returns the chosen indices, with
optional per-sample values aligned with them and a summary, in a :class:`SelectionResult`.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..component import register
from ..params import Params
from .base import SelectionContext, SelectionResult, Selector


@dataclass
class CustomParams(Params):
    """Declare your parameters here, with a default and a help text each; unknown keys are rejected."""


@register
class CustomSelector(Selector):
    name = "custom"
    Params = CustomParams
    summary = "template: the first rows of the training set"

    def select(self, ctx: SelectionContext) -> SelectionResult:
        n = ctx.train_size
        return SelectionResult([i % n for i in range(ctx.num_samples)], summary={"wrapped": ctx.num_samples > n})
