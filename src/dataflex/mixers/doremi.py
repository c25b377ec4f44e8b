"""``doremi``: domain weights by Group DRO against a reference model (Xie et al., NeurIPS 2023, step 2).

DoReMi runs in three steps (docs/mixers/doremi.md): (1) train a reference model on fixed
proportions (``static``); (2) train a proxy model with this mixer; (3) train the final model on
the weights step 2 wrote. In step 2, rows are drawn by the sampling proportions (the paper's
reference distribution, here ``init_mixture_proportions``: uniform by default) and the mixer keeps
domain weights α (uniform at the start). Between two updates, over every micro-batch and rank,
the proxy's and the reference model's per-token losses give the per-domain excess loss

    λ_d = Σ over d's supervised tokens of max(ℓ_proxy − ℓ_ref, 0) / number of those tokens

(a domain without tokens since the last update keeps its previous λ). At each update

    α' = α · exp(η λ),    α = (1 − c) α' / Σ α' + c / k,

and until the next update the proxy trains on the α-weighted domain loss Σ_d α_d · L_d, L_d the
mean token loss of domain d's rows in the step (the Group-DRO objective; the original computed α
but never changed the loss with it). At the end, the weights averaged over the steps they were
in force are written to ``<output_dir>/doremi_domain_weights.json``, which step 3's
``init_mixture_proportions`` names directly.

Paper values: η = 1, c = 1e-3 (the defaults here); the original DataFlex's components file sets
η = 0.1, c = 0.01.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import Any

import torch

from ..component import register
from ..params import Params
from .base import MixContext, MixDecision, Mixer

WEIGHTS_FILE = "doremi_domain_weights.json"


@dataclass
class DoremiParams(Params):
    reference_model_path: str | None = field(
        default=None, metadata={"help": "The step-1 reference model (a local folder with config.json). Required."})
    reweight_eta: float = field(default=1.0, metadata={"help": "η, step size of the exponentiated update (> 0)."})
    reweight_eps: float = field(default=1e-3, metadata={"help": "c, smoothing towards uniform, in [0, 1)."})

    def check(self) -> None:
        path = self.reference_model_path
        if not path:
            self.fail("reference_model_path", "the folder of the reference model trained in DoReMi step 1")
        if not os.path.isfile(os.path.join(os.path.expanduser(path), "config.json")):
            self.fail("reference_model_path", "an existing model folder (with config.json), e.g. the output_dir of "
                                              "DoReMi step 1")
        if not (math.isfinite(self.reweight_eta) and self.reweight_eta > 0):
            self.fail("reweight_eta", "a number > 0 (paper: 1.0)")
        if not 0 <= self.reweight_eps < 1:
            self.fail("reweight_eps", "a number in [0, 1) (paper: 1e-3)")


def doremi_update(alpha: torch.Tensor, excess: torch.Tensor, eta: float, eps: float) -> torch.Tensor:
    """One DoReMi step: α' = α exp(η λ), then (1 − c) α'/Σα' + c/k (float64, in log space)."""
    log_alpha = torch.log(alpha.double()) + eta * excess.double()
    mixed = torch.softmax(log_alpha, dim=0)
    return (1 - eps) * mixed + eps / len(alpha)


@register
class DoremiMixer(Mixer):
    name = "doremi"
    Params = DoremiParams
    needs = frozenset({"excess"})
    acts_on = "loss"  # α weighs the domains' losses; the sampling proportions stay the reference distribution
    summary = "DoReMi step 2: domain weights from the excess loss over a reference model (Group DRO)"

    @property
    def reference_model_path(self) -> str | None:
        return self.params.reference_model_path

    def setup(self, domains, sizes, initial, total_steps, warmup_step) -> None:
        super().setup(domains, sizes, initial, total_steps, warmup_step)
        k = len(domains)
        self.alpha = torch.full((k,), 1.0 / k, dtype=torch.float64)
        self.excess = torch.zeros(k, dtype=torch.float64)  # last λ per domain
        self.weighted_sum = torch.zeros(k, dtype=torch.float64)  # Σ α x steps it was in force
        self.weighted_steps = 0
        self.last_step: int | None = None

    def initial_loss_weights(self) -> list[float]:
        return self.alpha.tolist()

    def _close(self, step: int) -> None:
        """Count the α in force since the last update for the average (nothing before the first update)."""
        if self.last_step is not None:
            n = step - self.last_step
            self.weighted_sum += self.alpha * n
            self.weighted_steps += n
        self.last_step = step

    def update(self, ctx: MixContext) -> MixDecision:
        p = self.params
        seen = ctx.stats.tokens > 0
        lam = torch.where(seen, ctx.stats.excess_sum / ctx.stats.tokens.clamp(min=1), self.excess)
        self.excess = lam
        self._close(ctx.step)  # the α in force until now counts for the average (from the first update on)
        self.alpha = doremi_update(self.alpha, lam, p.reweight_eta, p.reweight_eps)
        return MixDecision(
            list(ctx.proportions), self.alpha.tolist(),
            {"excess_loss": lam.tolist(), "domain_weights": self.alpha.tolist(),
             "average_domain_weights": self.average().tolist()},
        )

    def average(self) -> torch.Tensor:
        if self.weighted_steps == 0:
            return self.alpha.clone()
        return self.weighted_sum / self.weighted_steps

    def finish(self, total_steps: int) -> None:
        self._close(total_steps)

    def outputs(self, output_dir: str) -> list[str]:
        avg = self.average()
        avg = avg / avg.sum()
        path = os.path.join(output_dir, WEIGHTS_FILE)
        data = {
            "domains": list(self.domains),
            "weights": avg.tolist(),
            "domain_weights": dict(zip(self.domains, avg.tolist())),
            "final_domain_weights": dict(zip(self.domains, self.alpha.tolist())),
            "steps_averaged": self.weighted_steps,
            "reweight_eta": self.params.reweight_eta,
            "reweight_eps": self.params.reweight_eps,
            "reference_model_path": self.params.reference_model_path,
        }
        os.makedirs(output_dir, exist_ok=True)
        with open(path, "w", encoding="utf-8") as fh:
            json.dump(data, fh, indent=2)
        return [path]

    def state_dict(self) -> dict[str, Any]:
        return {"alpha": self.alpha.tolist(), "excess": self.excess.tolist(),
                "weighted_sum": self.weighted_sum.tolist(), "weighted_steps": self.weighted_steps,
                "last_step": self.last_step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("alpha") is None:
            return
        self.alpha = torch.tensor(state["alpha"], dtype=torch.float64)
        self.excess = torch.tensor(state["excess"], dtype=torch.float64)
        self.weighted_sum = torch.tensor(state["weighted_sum"], dtype=torch.float64)
        self.weighted_steps = int(state["weighted_steps"])
        self.last_step = state["last_step"]
