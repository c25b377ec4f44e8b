"""``odm``: online data mixing as a multi-armed bandit (Albalak et al., 2023, "Efficient Online Data Mixing").

Each domain is an arm of EXP3. After every optimizer step the reward of each domain that was
trained on in the step is its training loss there (no extra compute): ℓ_d = the mean token loss
of the step's rows from domain d, summed over micro-batches and ranks. With K domains, t the
number of updates so far (1, 2, ...) and π the policy the step was drawn with,

    R̂_d ← α R̂_d + (1 − α) · reward_scale · ℓ_d / π_d        (only domains trained on in the step)
    ε_t = max(min_exploration_rate, min(1/K, sqrt(ln K / (K t))))
    π ← (1 − K ε_t) · softmax(ε_{t−1} R̂) + ε_t

The 1/π_d importance weight is the bandit's: in the paper each batch comes from one domain drawn
from π, so domain d is observed with probability π_d. To keep that meaning, rows are laid out
one domain per micro-batch: every micro-batch of every rank draws its domain from π (the
official runs' ``mixed_minibatches`` setting; with one process and no gradient accumulation
this is exactly one domain per step). ``warmup_steps`` counts optimizer steps from the start of
training, like the YAML's ``warmup_step``: ODM starts when both have passed. Before, its
``initial_proportions`` hold (from step 0 when the YAML sets no ``init_mixture_proportions``,
else after the YAML's warm-up).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from ..component import register
from ..params import Params
from .base import MixContext, MixDecision, Mixer, normalise


@dataclass
class OdmParams(Params):
    alpha: float = field(default=0.9, metadata={"help": "Smoothing of the reward estimates, in [0, 1)."})
    warmup_steps: int = field(default=0, metadata={"help": "Optimizer steps on the initial proportions before ODM "
                                                             "starts (counted from the start of training)."})
    reward_scale: float = field(default=1.0, metadata={"help": "Multiplies the loss before it becomes a reward (> 0)."})
    min_exploration_rate: float = field(default=0.0, metadata={"help": "Lower bound of ε_t, in [0, 1/K]."})
    initial_proportions: list[float] | None = field(
        default=None, metadata={"help": "Proportions before ODM starts; null: init_mixture_proportions."})

    def check(self) -> None:
        if not 0 <= self.alpha < 1:
            self.fail("alpha", "a number in [0, 1)")
        if self.warmup_steps < 0:
            self.fail("warmup_steps", "an integer >= 0")
        if not (math.isfinite(self.reward_scale) and self.reward_scale > 0):
            self.fail("reward_scale", "a number > 0")
        if not 0 <= self.min_exploration_rate <= 1:
            self.fail("min_exploration_rate", "a number in [0, 1/K] (K = number of domains)")
        props = self.initial_proportions
        if props is not None and (not props or any(x < 0 for x in props) or abs(sum(props) - 1) > 1e-6):
            self.fail("initial_proportions", "one number >= 0 per domain, summing to 1")


def exploration(t: int, k: int, floor: float) -> float:
    """ε_t = max(floor, min(1/K, sqrt(ln K / (K t)))); ε_0 = 1/K."""
    if t <= 0:
        return 1.0 / k
    return max(floor, min(1.0 / k, math.sqrt(math.log(k) / (k * t))))


def odm_policy(rewards: torch.Tensor, eps_prev: float, eps_now: float) -> torch.Tensor:
    k = len(rewards)
    return (1 - k * eps_now) * torch.softmax(eps_prev * rewards.double(), dim=0) + eps_now


@register
class OdmMixer(Mixer):
    name = "odm"
    Params = OdmParams
    needs = frozenset({"losses"})
    granularity = "micro_batch"
    every_step = True
    summary = "ODM: EXP3 bandit over domains, rewarded by their training loss"

    def own_start(self, domains) -> list[float] | None:
        p = self.params
        if p.initial_proportions is not None and len(p.initial_proportions) != len(domains):
            p.fail("initial_proportions", f"{len(domains)} numbers, one per domain of dataset ({', '.join(domains)})")
        return normalise(p.initial_proportions) if p.initial_proportions is not None else None

    def setup(self, domains, sizes, initial, total_steps, warmup_step) -> None:
        super().setup(domains, sizes, initial, total_steps, warmup_step)
        k = len(domains)
        p = self.params
        self.own_start(domains)
        if k > 1 and p.min_exploration_rate > 1.0 / k:
            p.fail("min_exploration_rate", f"a number in [0, 1/K] = [0, {1.0 / k:.4g}] for K = {k} domains")
        self.initial = normalise(p.initial_proportions) if p.initial_proportions is not None else list(initial)
        self.start_step = max(warmup_step, p.warmup_steps)
        self.rewards = torch.zeros(k, dtype=torch.float64)
        self.t = 0
        self.policy = list(self.initial)

    def update(self, ctx: MixContext) -> MixDecision:
        p = self.params
        k = len(ctx.domains)
        if ctx.step < self.start_step:
            self.policy = list(self.initial)
            return MixDecision(list(self.policy), summary={"phase": "warm-up", "starts_at": self.start_step})
        stats = ctx.stats
        observed = stats.tokens > 0
        losses = stats.loss_sum / stats.tokens.clamp(min=1)
        pi = torch.tensor(ctx.proportions, dtype=torch.float64)
        if ctx.step > self.start_step:  # the first update has no step of ODM's own to learn from yet
            reward = p.reward_scale * losses / pi.clamp(min=1e-12)
            self.rewards = torch.where(observed, p.alpha * self.rewards + (1 - p.alpha) * reward, self.rewards)
        eps_prev = exploration(self.t, k, p.min_exploration_rate)
        self.t += 1
        eps_now = exploration(self.t, k, p.min_exploration_rate)
        self.policy = odm_policy(self.rewards, eps_prev, eps_now).tolist()
        return MixDecision(list(self.policy), summary={
            "rewards": self.rewards.tolist(), "epsilon": eps_now, "t": self.t,
            "domain_loss": [float(x) if o else None for x, o in zip(losses.tolist(), observed.tolist())],
        })

    def state_dict(self) -> dict[str, Any]:
        return {"rewards": self.rewards.tolist(), "t": self.t, "policy": list(self.policy)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("rewards") is not None:
            self.rewards = torch.tensor(state["rewards"], dtype=torch.float64)
            self.t = int(state["t"])
            self.policy = [float(x) for x in state["policy"]]
