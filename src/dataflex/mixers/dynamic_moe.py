"""``dynamic_moe``: proportions from how differently a mixture-of-experts model routes each domain.

Zhu et al., 2024, "Dynamic data mixing maximizes instruction tuning for mixture-of-experts".
At every update, for each domain d, its eval set (``mixer_eval_dataset``, one per domain, in the
order of ``dataset``) is run through the current model and the tokens routed to each expert of
the last MoE layer are counted (top-k of the router logits, padding excluded), giving the gate
load distribution Ô_d (counts / total). With the domain weights w in force,

    Δ_d = mean_j ||Ô_d − Ô_j||_2                      (over all domains, d itself included)
    α = softmax(log w + η Δ),    w ← (1 − c) α + c / k

so a domain whose routing stands apart from the others gets more weight. Each domain uses the
first min(``eval_samples``, ``collect_steps`` x ``eval_batch_size``) rows of its eval set, in
batches of ``eval_batch_size``. The model must report router logits (transformers' Qwen2-MoE,
Mixtral, ...: ``output_router_logits``); another model is an error at start (the original
froze the weights silently).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
import torch

from ..component import register
from ..params import Params
from ..scoring.engine import Batch, eval_mode
from .base import MixContext, MixDecision, Mixer


@dataclass
class DynamicMoeParams(Params):
    eta: float = field(default=10.0, metadata={"help": "η: how strongly the routing distance moves the weights (> 0)."})
    c: float = field(default=0.05, metadata={"help": "Smoothing towards uniform, in [0, 1)."})
    collect_steps: int = field(default=5, metadata={"help": "Eval batches per domain at each update (>= 1)."})
    eval_samples: int = field(default=1000, metadata={"help": "At most this many eval rows per domain (>= 1)."})
    eval_batch_size: int = field(default=32, metadata={"help": "Rows per eval forward (>= 1)."})

    def check(self) -> None:
        if not (math.isfinite(self.eta) and self.eta > 0):
            self.fail("eta", "a number > 0")
        if not 0 <= self.c < 1:
            self.fail("c", "a number in [0, 1)")
        for key in ("collect_steps", "eval_samples", "eval_batch_size"):
            if getattr(self, key) < 1:
                self.fail(key, "an integer >= 1")


def gate_loads(router_logits: torch.Tensor, top_k: int, mask: torch.Tensor | None, batch: int) -> torch.Tensor:
    """Per-sample expert counts [batch, experts] of one layer's router logits [batch x tokens, experts]."""
    experts = router_logits.shape[-1]
    logits = router_logits.reshape(batch, -1, experts)
    chosen = torch.topk(logits.float(), top_k, dim=-1).indices  # [b, t, k]
    counts = torch.zeros(batch, logits.shape[1], experts, device=logits.device)
    counts.scatter_(-1, chosen, 1.0)
    if mask is not None and mask.dim() == 2 and mask.shape[1] == logits.shape[1]:
        counts = counts * (mask != 0).unsqueeze(-1).to(counts.dtype)
    return counts.sum(dim=1)


def routing_distance(loads: torch.Tensor) -> torch.Tensor:
    """Δ_d = mean over j of ||Ô_d − Ô_j||_2 for L1-normalised loads [k, experts]."""
    dist = torch.cdist(loads.double(), loads.double())
    return dist.mean(dim=1)


def moe_update(weights: torch.Tensor, delta: torch.Tensor, eta: float, c: float) -> torch.Tensor:
    alpha = torch.softmax(torch.log(weights.double().clamp(min=1e-300)) + eta * delta.double(), dim=0)
    w = (1 - c) * alpha + c / len(weights)
    return w / w.sum()


def top_k_of(model: torch.nn.Module) -> int:
    config = getattr(model, "config", None)
    for key in ("num_experts_per_tok", "moe_topk", "top_k"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    raise ValueError("the model's config names no experts-per-token count (num_experts_per_tok)")


@register
class DynamicMoeMixer(Mixer):
    name = "dynamic_moe"
    Params = DynamicMoeParams
    needs = frozenset({"router"})
    summary = "dynamic MoE mixing: weights from the distances between the domains' expert gate loads"

    def setup(self, domains, sizes, initial, total_steps, warmup_step) -> None:
        super().setup(domains, sizes, initial, total_steps, warmup_step)
        self.loads: torch.Tensor | None = None

    def prepare(self, ctx: MixContext) -> None:
        p = self.params
        engine = ctx.scorer
        model = engine.model
        k = top_k_of(model)
        rows = min(p.eval_samples, p.collect_steps * p.eval_batch_size)

        def loads_of(batch: Batch) -> torch.Tensor:
            out = model(**batch.inputs, output_router_logits=True, logits_to_keep=1)
            router = getattr(out, "router_logits", None)
            if not router:
                raise ValueError("the model returned no router logits (output_router_logits)")
            return gate_loads(router[-1], k, batch.inputs.get("attention_mask"), batch.labels.shape[0])

        per_domain = []
        with eval_mode(model), torch.no_grad():
            for d, dataset in enumerate(ctx.eval_sets):
                n = min(rows, len(dataset))
                values = engine.map(dataset, range(n), p.eval_batch_size, loads_of,
                                    f"dynamic_moe gate loads of '{ctx.domains[d]}'")
                total = torch.stack(values).double().sum(dim=0)
                per_domain.append(total / total.sum().clamp(min=1e-12))
        self.loads = torch.stack(per_domain)

    def update(self, ctx: MixContext) -> MixDecision:
        p = self.params
        delta = routing_distance(self.loads)
        w = moe_update(torch.tensor(ctx.proportions, dtype=torch.float64), delta, p.eta, p.c)
        return MixDecision(w.tolist(), summary={"routing_distance": delta.tolist(), "gate_loads": self.loads.tolist()})
