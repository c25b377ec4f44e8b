"""Adam's moments for each trainable parameter, wherever the optimizer keeps them.

Preconditioning
---------------
With the optimizer's moments ``m``, ``v`` and its ``betas``, ``eps`` for a parameter,

    m' = b1 m + (1 - b1) g,   v' = b2 v + (1 - b2) g^2,   Gamma = m' / (sqrt(v') + eps)

(no bias correction, as in the LESS formula). :func:`adam_moments` returns ``None`` when the
optimizer has no moments yet (before its first step) or keeps none (SGD, Adafactor); the
caller then falls back to plain gradients with a warning.

Under DeepSpeed the moments of a parameter are spread over the ranks; every rank gathers them
(collectives, same order on every rank):

* ZeRO-1/2: per parameter group, the model's parameters are views into one flat buffer that is
  cut into equal partitions, rank ``r`` keeping the fp32 master copy and the Adam state of
  partition ``r``. The partitions' states are all-gathered and each parameter's slice is cut at
  its offset in the flat buffer, read from where its storage lies. (DeepSpeed's own
  ``safe_get_full_optimizer_state`` assumes the buffer follows the parameters' order; DeepSpeed
  0.19.8 reorders them and the accessor returns other parameters' moments on two ranks.) As a
  guard, the gathered fp32 master weights must equal the model's weights; if they do not, the
  layout was not understood and plain gradients are used, with a warning.
* ZeRO-3: ``deepspeed.utils.safe_get_full_optimizer_state`` per parameter.

``tests/e2e/test_deepspeed.py`` runs ZeRO-2 and ZeRO-3 on two CPU processes and compares the scores
of every sample with a run without DeepSpeed.

Every function here that touches DeepSpeed runs collectives (all ranks, same order): callers
wrap it in :meth:`dataflex.dist.agreement.Agreement.section`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Sequence

import torch

logger = logging.getLogger("dataflex")


@dataclass
class AdamMoment:
    exp_avg: torch.Tensor  # flattened, fp32
    exp_avg_sq: torch.Tensor
    beta1: float
    beta2: float
    eps: float


def adam_direction(grad: torch.Tensor, m: AdamMoment) -> torch.Tensor:
    """Gamma = m' / (sqrt(v') + eps) for a ``batch x numel`` gradient and one parameter's moments."""
    m1 = grad.mul(1 - m.beta1).add_(m.exp_avg, alpha=m.beta1)
    v1 = grad.square().mul_(1 - m.beta2).add_(m.exp_avg_sq, alpha=m.beta2)
    return m1.div_(v1.sqrt_().add_(m.eps))


def is_partitioned_param(param: torch.Tensor) -> bool:
    """True for a DeepSpeed ZeRO-3 parameter (this rank holds a slice; ``ds_shape`` is its real shape)."""
    return hasattr(param, "ds_id")


def optimizer_chain(optimizer: Any) -> list[Any]:
    """``optimizer`` and the optimizers it wraps (accelerate, DeepSpeed: ``.optimizer``), outermost first."""
    chain = [optimizer]
    for _ in range(4):
        inner = getattr(chain[-1], "optimizer", None)
        if inner is None or inner is chain[-1]:
            break
        chain.append(inner)
    return chain


def adam_moments(optimizer: Any, model: torch.nn.Module, names: Sequence[str], device: Any = None
                 ) -> tuple[dict[str, AdamMoment] | None, str]:
    """Adam's ``exp_avg`` / ``exp_avg_sq`` and hyper-parameters of each named parameter.

    Returns ``(moments, "")`` or ``(None, reason)`` when they cannot be used (no optimizer, no
    state yet, not an Adam-type optimizer). Under DeepSpeed ZeRO the moments live in flat,
    partitioned buffers: they are gathered per parameter with DeepSpeed's own helper, a
    collective that every rank runs in the same order (this function is called on every rank).
    """
    if optimizer is None:
        return None, "no optimizer"
    chain = optimizer_chain(optimizer)
    opt = chain[-1]
    params = dict(model.named_parameters())
    zero12 = next((o for o in chain if hasattr(o, "bit16_groups_flat") and hasattr(o, "single_partition_of_fp32_groups")),
                  None)
    if zero12 is not None:
        return _zero12_moments(zero12, opt, params, names, device)
    # ZeRO-3 parameters carry `ds_id`; DeepSpeed's bf16 optimizer gives every parameter `_hp_mapping`
    # (None on ranks that hold none of it): test for the attributes so that all ranks gather
    if any(is_partitioned_param(params[n]) or hasattr(params[n], "_hp_mapping") for n in names):
        return _deepspeed_moments(opt, params, names, device)
    state = getattr(opt, "state", None)
    groups = getattr(opt, "param_groups", None)
    if state is None or groups is None:
        return None, f"optimizer {type(opt).__name__} exposes no per-parameter state"
    group_of = {id(p): g for g in groups for p in g["params"]}
    out: dict[str, AdamMoment] = {}
    for name in names:
        p = params[name]
        st = state.get(p) if hasattr(state, "get") else None
        if not st or "exp_avg" not in st or "exp_avg_sq" not in st:
            if id(p) in group_of and "betas" in group_of[id(p)]:
                return None, "the optimizer has no moments yet (no optimizer step taken)"
            return None, f"optimizer {type(opt).__name__} keeps no Adam moments for '{name}'"
        group = group_of.get(id(p), {})
        if "betas" not in group:
            return None, f"optimizer {type(opt).__name__} has no betas"
        if st["exp_avg"].numel() != p.numel():
            return None, f"Adam state of '{name}' is partitioned or quantised"
        b1, b2 = group["betas"]
        dev = device if device is not None else p.device
        out[name] = AdamMoment(st["exp_avg"].detach().reshape(-1).to(dev, torch.float32),
                               st["exp_avg_sq"].detach().reshape(-1).to(dev, torch.float32),
                               float(b1), float(b2), float(group.get("eps", 1e-8)))
    return out, ""


def _deepspeed_hparams(opt: Any) -> tuple[tuple[float, float, float] | None, str]:
    """``(beta1, beta2, eps)`` of the optimizer DeepSpeed steps (one set for all its groups), or ``(None, reason)``."""
    group = next((g for g in getattr(opt, "param_groups", []) if "betas" in g), None)
    if group is None:
        return None, f"DeepSpeed optimizer {type(opt).__name__} has no betas"
    b1, b2 = group["betas"]
    return (float(b1), float(b2), float(group.get("eps", 1e-8))), ""


def _gather_partitions(part: torch.Tensor, group: Any, device: torch.device) -> torch.Tensor:
    """The equal-sized 1-D ``part`` of every rank of ``group``, concatenated in rank order, on ``device``.

    ``device`` is where the model's weights are (an offloaded optimizer keeps its partition on the
    CPU, which NCCL cannot gather).
    """
    import torch.distributed as dist

    part = part.detach().reshape(-1).to(device)
    if not dist.is_available() or not dist.is_initialized():
        return part
    pieces = [torch.empty_like(part) for _ in range(dist.get_world_size(group=group))]
    dist.all_gather(pieces, part.contiguous(), group=group)
    return torch.cat(pieces)


def _zero12_moments(zero: Any, opt: Any, params: dict[str, torch.nn.Parameter], names: Sequence[str], device: Any
                    ) -> tuple[dict[str, AdamMoment] | None, str]:
    """Adam moments under DeepSpeed ZeRO-1/2, gathered from the ranks' partitions (module docstring)."""
    hparams, reason = _deepspeed_hparams(opt)
    if hparams is None:
        return None, reason
    wanted = {id(params[n]): n for n in names}
    state = getattr(opt, "state", {})
    groups = getattr(zero, "real_dp_process_group", None) or [None] * len(zero.bit16_groups_flat)
    out: dict[str, AdamMoment] = {}
    for flat, lp_params, part, dp in zip(zero.bit16_groups_flat, zero.bit16_groups,
                                         zero.single_partition_of_fp32_groups, groups):
        members = [p for p in lp_params if id(p) in wanted]
        if not members:
            continue
        st = state.get(part) if hasattr(state, "get") else None
        if not st or "exp_avg" not in st or "exp_avg_sq" not in st:  # same on every rank: steps are in lockstep
            return None, "the optimizer has no moments yet (no optimizer step taken)"
        full = {key: _gather_partitions(t, dp, flat.device) for key, t in
                (("weights", part), ("exp_avg", st["exp_avg"]), ("exp_avg_sq", st["exp_avg_sq"]))}
        for p in members:
            offset = (p.data_ptr() - flat.data_ptr()) // p.element_size()
            n = p.numel()
            if offset < 0 or offset + n > full["weights"].numel():
                return None, f"DeepSpeed parameter '{wanted[id(p)]}' lies outside its flat buffer"
            master = full["weights"][offset:offset + n]
            if not torch.allclose(master.to(p.dtype).float(), p.detach().reshape(-1).float(), rtol=1e-2, atol=1e-6):
                return None, f"DeepSpeed's partition layout was not understood ('{wanted[id(p)]}' does not match " \
                             "its fp32 master copy)"
            dev = device if device is not None else p.device
            out[wanted[id(p)]] = AdamMoment(full["exp_avg"][offset:offset + n].to(dev, torch.float32),
                                            full["exp_avg_sq"][offset:offset + n].to(dev, torch.float32), *hparams)
    missing = next((n for n in names if n not in out), None)
    if missing is not None:
        return None, f"DeepSpeed keeps no Adam moments for '{missing}'"
    return out, ""


def _deepspeed_moments(opt: Any, params: dict[str, torch.nn.Parameter], names: Sequence[str], device: Any
                       ) -> tuple[dict[str, AdamMoment] | None, str]:
    """Full Adam moments under DeepSpeed ZeRO-3 (or its bf16 optimizer), parameter by parameter."""
    try:
        from deepspeed.utils import safe_get_full_optimizer_state
    except ImportError:
        return None, "DeepSpeed parameters but no deepspeed module"
    hparams, reason = _deepspeed_hparams(opt)
    if hparams is None:
        return None, reason
    if not getattr(opt, "state", None):  # ranks step together: empty everywhere before the first step
        return None, "the optimizer has no moments yet (no optimizer step taken)"
    out: dict[str, AdamMoment] = {}
    missing = None
    for name in names:  # every rank gathers every parameter (a collective), even after a miss
        p = params[name]
        m = safe_get_full_optimizer_state(p, "exp_avg")
        v = safe_get_full_optimizer_state(p, "exp_avg_sq")
        if m is None or v is None:
            missing = missing or name
            continue
        dev = device if device is not None else m.device
        out[name] = AdamMoment(m.detach().reshape(-1).to(dev, torch.float32),
                               v.detach().reshape(-1).to(dev, torch.float32), *hparams)
    if missing is not None:
        return None, f"DeepSpeed has no Adam moments for '{missing}' yet"
    return out, ""
