"""A second, frozen model next to the one being trained, and what mixers need to know about MoE models.

* :class:`ReferenceModel` - DoReMi's reference: per-token losses of the same batch, and the
  per-sample excess loss Σ_t max(ℓ_proxy − ℓ_ref, 0) over the supervised tokens. It is loaded
  once per rank, frozen, in the training model's dtype, and must share its vocabulary.
* :func:`router_modules` / :func:`num_experts` - the routers of a mixture-of-experts model
  (transformers' Qwen2-MoE, Mixtral, ...), for ``freeze_gate`` and ``dynamic_moe``.
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import ConfigError
from .losses import token_losses


def num_experts(config: Any) -> int | None:
    for key in ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 1:
            return value
    return None


def router_modules(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """The expert routers: modules called ``gate`` (or a ``...Router``) whose weight has one row per expert.

    A dense model's ``gate_proj`` and Qwen2-MoE's one-row ``shared_expert_gate`` are not routers.
    """
    experts = num_experts(getattr(model, "config", None))
    if experts is None:
        return []
    out = []
    for name, module in model.named_modules():
        last = name.split(".")[-1]
        weight = getattr(module, "weight", None)
        if (last == "gate" or type(module).__name__.endswith("Router")) and torch.is_tensor(weight) \
                and weight.dim() == 2 and weight.shape[0] == experts:
            out.append((name, module))
    return out


class ReferenceModel:
    """A frozen causal LM scoring the training batches token by token (DoReMi)."""

    def __init__(self, path: str, like: torch.nn.Module, device: Any, work: Any = None):
        """``work``: the run's :class:`~dataflex.scoring.engine.DecisionWork`; every forward of the reference
        adds its batch's non-padding tokens to it (a decision's cost that training does not pay)."""
        from transformers import AutoModelForCausalLM

        dtype = getattr(like, "dtype", None) or torch.float32
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
        self.model.to(device).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        ours = like.get_output_embeddings().weight.shape[0]
        theirs = self.model.get_output_embeddings().weight.shape[0]
        if ours != theirs:
            raise ConfigError(f"reference_model_path: the reference model has a vocabulary of {theirs} tokens, the "
                              f"trained model {ours}; allowed: a reference trained with the same tokenizer")
        self.work = work
        if work is not None:
            work.local = True

    @torch.no_grad()
    def token_losses(self, inputs: dict[str, Any], labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        kwargs = {k: v for k, v in inputs.items() if k not in ("labels", "output_hidden_states", "num_items_in_batch")}
        kwargs["use_cache"] = False
        logits = self.model(**kwargs).logits
        if self.work is not None:
            mask = inputs.get("attention_mask")
            self.work.add_local(int((mask != 0).sum()) if mask is not None else int(inputs["input_ids"].numel()))
        return token_losses(logits, labels)

    @torch.no_grad()
    def excess_sums(self, inputs: dict[str, Any], labels: torch.Tensor, proxy_logits: torch.Tensor) -> torch.Tensor:
        """Per sample: Σ over supervised tokens of max(ℓ_proxy − ℓ_ref, 0)."""
        ref, mask = self.token_losses(inputs, labels)
        proxy, _ = token_losses(proxy_logits.detach(), labels)
        excess = torch.clamp(proxy - ref.to(proxy.device), min=0) * mask
        return excess.sum(dim=1)
