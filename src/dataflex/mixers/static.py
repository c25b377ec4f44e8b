"""``static``: fixed proportions - the baseline of a mixing experiment, and DoReMi's steps 1 and 3.

At every update it returns ``proportions`` when set, else the proportions in force (the YAML's
``init_mixture_proportions``). With ``static_mix: true`` no mixer is consulted at all and the
initial proportions hold for the whole run.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..component import register
from ..params import Params
from .base import MixContext, MixDecision, Mixer, normalise


@dataclass
class StaticParams(Params):
    proportions: list[float] | None = field(
        default=None, metadata={"help": "One proportion per domain (>= 0, summing to 1); null: keep the initial ones."})

    def check(self) -> None:
        if self.proportions is not None:
            if not self.proportions or any(p < 0 for p in self.proportions) or abs(sum(self.proportions) - 1) > 1e-6:
                self.fail("proportions", "one number >= 0 per domain, summing to 1")


@register
class StaticMixer(Mixer):
    name = "static"
    Params = StaticParams
    summary = "fixed proportions"

    def own_start(self, domains) -> list[float] | None:
        p = self.params.proportions
        if p is not None and len(p) != len(domains):
            self.params.fail("proportions", f"{len(domains)} numbers, one per domain of dataset ({', '.join(domains)})")
        return normalise(p) if p is not None else None

    def setup(self, domains, sizes, initial, total_steps, warmup_step) -> None:
        super().setup(domains, sizes, initial, total_steps, warmup_step)
        self.own_start(domains)

    def update(self, ctx: MixContext) -> MixDecision:
        props = self.params.proportions
        return MixDecision(normalise(props) if props is not None else list(ctx.proportions))
