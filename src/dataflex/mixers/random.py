"""``random``: a fresh seeded draw of proportions at every update (a control for the adaptive mixers).

The proportions are a draw from a symmetric Dirichlet(``concentration``) distribution (1: uniform
over all mixtures), seeded by ``seed`` and the update number: different at every update, the
same on every rank and in every run. (The original reseeded numpy's global generator on every
call and so returned the same vector every time.)
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..component import register
from ..params import Params
from ..seeding import derive_seed
from .base import MixContext, MixDecision, Mixer


@dataclass
class RandomMixParams(Params):
    seed: int = field(default=42, metadata={"help": "Seed of the draws (with the update number)."})
    concentration: float = field(default=1.0, metadata={"help": "Dirichlet concentration (> 0); large: near uniform."})

    def check(self) -> None:
        if not self.concentration > 0:
            self.fail("concentration", "a number > 0")


def dirichlet(seed: int, update: int, k: int, concentration: float) -> list[float]:
    rng = np.random.default_rng(derive_seed(seed, "random-mixer", update))
    return [float(x) for x in rng.dirichlet([concentration] * k)]


@register
class RandomMixer(Mixer):
    name = "random"
    Params = RandomMixParams
    summary = "a seeded Dirichlet draw of proportions at every update"

    def update(self, ctx: MixContext) -> MixDecision:
        return MixDecision(dirichlet(self.params.seed, ctx.update, len(ctx.domains), self.params.concentration))
