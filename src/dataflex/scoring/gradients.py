"""Per-sample gradients of the trainable (LoRA) parameters, a whole batch per forward + backward.

How
---
Every trainable parameter must belong to an ``nn.Linear`` (LoRA's ``lora_A`` / ``lora_B``, or a
linear layer LLaMA-Factory makes trainable). For a linear layer ``y = x W^T + b`` applied to
the tokens ``t`` of sample ``n``, the gradient of a loss that is a sum of per-sample terms
``L = sum_n L_n`` splits by sample:

    dL_n/dW = sum_t (dL/dy[n, t])^T x[n, t],    dL_n/db = sum_t dL/dy[n, t]

because sample ``n``'s activations only ever feed ``L_n`` (attention mixes tokens of one
sample, never of two). So one forward pass records each layer's input ``x`` (forward hook), one
``torch.autograd.grad`` of ``sum_n L_n`` with respect to the layers' *outputs* gives every
``dL/dy``, and a batched matmul per layer gives all per-sample gradients. ``L_n`` is the mean
token cross-entropy over sample ``n``'s supervised tokens (labels != -100), the same loss the
scoring engine reports and the model reports for the sample alone. Output gradients at padded
positions are zeroed with the attention mask, so padding contributes nothing.

``torch.autograd.grad`` with respect to activations never writes ``.grad``: the parameters'
gradient buffers stay as the trainer left them, and no weight gradient of the full batch is
computed at all. The model runs in eval mode (dropout, LoRA dropout included, off) and its
training mode is restored afterwards.

Only the logits of positions whose next token is supervised are computed (``logits_to_keep``),
which leaves the loss and every gradient unchanged and saves most of the vocabulary projection.

Hooks versus ``torch.func``
---------------------------
Measured with ``python bench/less.py --torch-func`` (tiny demo model, CPU, 1 thread, batch 16,
600 samples of 28-253 tokens): per-sample gradients only, the linear-layer identity ran at 315
samples/s and ``torch.func.vmap(grad(functional_call(...)))`` at 237 (identity 1.33x faster).
vmap also needs surgery on a Hugging Face model: transformers' attention-mask helpers branch on
data (rejected under vmap), so the mask has to be dropped - exact only for right padding - and
PEFT/LLaMA-Factory's input-require-grads hook has to be removed. The identity works on the
model as the trainer holds it, so it is what is used here.

Adam preconditioning
--------------------
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

``tests/test_deepspeed.py`` runs ZeRO-2 and ZeRO-3 on two CPU processes and compares the scores
of every sample with a run without DeepSpeed.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import torch

from .engine import eval_mode, length_batches, supervised_logits, token_loss_sums
from .projection import CountSketchProjector

logger = logging.getLogger("dataflex")


class UnsupportedParameters(ValueError):
    """A trainable parameter that is not the weight or bias of an ``nn.Linear``."""


# --------------------------------------------------------------------------- which layers
@dataclass(frozen=True)
class LinearTarget:
    module_name: str
    module: torch.nn.Linear
    weight_name: str | None  # full parameter names, None when that part is frozen / absent
    bias_name: str | None


def trainable_linears(model: torch.nn.Module) -> list[LinearTarget]:
    """Every ``nn.Linear`` with a trainable weight or bias, in ``named_modules`` order.

    Raises :class:`UnsupportedParameters` naming the first trainable parameter that no linear
    layer covers (e.g. DoRA's magnitude vectors or a trainable embedding).
    """
    targets = []
    covered: set[int] = set()
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        w = module.weight if module.weight.requires_grad else None
        b = module.bias if module.bias is not None and module.bias.requires_grad else None
        if w is None and b is None:
            continue
        prefix = f"{name}." if name else ""
        targets.append(LinearTarget(name, module, prefix + "weight" if w is not None else None,
                                    prefix + "bias" if b is not None else None))
        covered.update(id(p) for p in (w, b) if p is not None)
    for name, param in model.named_parameters():
        if param.requires_grad and id(param) not in covered:
            raise UnsupportedParameters(
                f"trainable parameter '{name}' is not part of a linear layer; per-sample gradients cover "
                "LoRA / linear weights only (no DoRA, no trainable embeddings or norms)"
            )
    if not targets:
        raise UnsupportedParameters("the model has no trainable parameters")
    return targets


# --------------------------------------------------------------------------- per-sample gradients
class BatchGradients:
    """Result of :func:`per_sample_gradients`: losses now, gradients layer by layer on demand.

    ``losses`` and ``counts`` are per sample (``counts == 0``: no supervised token, gradient 0).
    Iterating yields ``(parameter name, batch x numel fp32 gradients)``; each layer's gradients
    are formed when asked for, so only one layer's per-sample gradients exist at a time.
    """

    def __init__(self, losses, counts, records, token_mask):
        self.losses = losses
        self.counts = counts
        self._records = records  # [(target, [(input, output_grad), ...])]
        self._mask = token_mask

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        for target, calls in self._records:
            weight, bias = None, None
            for x, gy in calls:
                batch = x.shape[0]
                x = x.reshape(batch, -1, x.shape[-1]).float()
                gy = gy.reshape(batch, -1, gy.shape[-1]).float()
                if self._mask is not None and self._mask.shape == gy.shape[:2]:
                    gy = gy * self._mask.unsqueeze(-1)
                if target.weight_name is not None:
                    w = torch.bmm(gy.transpose(1, 2), x)  # batch x out x in
                    weight = w if weight is None else weight + w
                if target.bias_name is not None:
                    b = gy.sum(dim=1)
                    bias = b if bias is None else bias + b
            if weight is not None:
                yield target.weight_name, weight.reshape(weight.shape[0], -1)
            if bias is not None:
                yield target.bias_name, bias

    def as_dict(self) -> dict[str, torch.Tensor]:
        return {name: grad for name, grad in self}


def per_sample_gradients(
    model: torch.nn.Module,
    inputs: dict[str, Any],
    labels: torch.Tensor,
    targets: Sequence[LinearTarget] | None = None,
) -> BatchGradients:
    """One forward and one backward of ``model`` on a padded batch; see the module docstring.

    ``inputs`` are the model's keyword arguments (no labels). The model runs in eval mode (no
    dropout, and no gradient checkpointing, which would run the hooks twice) and gets its mode
    back; ``.grad`` of the parameters is not touched.
    """
    targets = list(targets) if targets is not None else trainable_linears(model)
    captured: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {i: [] for i in range(len(targets))}
    handles = []

    def hook_for(i: int) -> Callable:
        def hook(module, args, kwargs, output):
            x = args[0] if args else kwargs["input"]
            captured[i].append((x.detach(), output))
        return hook

    for i, target in enumerate(targets):
        handles.append(target.module.register_forward_hook(hook_for(i), with_kwargs=True))
    try:
        with eval_mode(model), torch.enable_grad():
            logits, targets_kept = supervised_logits(
                model, inputs, labels, on_retry=lambda: [calls.clear() for calls in captured.values()])
            sums, counts = token_loss_sums(logits, targets_kept)
            losses = sums / counts.clamp(min=1)
            total = losses.sum()
    finally:
        for h in handles:
            h.remove()
    del logits
    outputs = [out for i in range(len(targets)) for _, out in captured[i]]
    if total.requires_grad and outputs:
        grads = torch.autograd.grad(total, outputs, allow_unused=True, materialize_grads=True)
    else:  # no supervised token in the whole batch: every gradient is zero
        grads = [torch.zeros_like(o) for o in outputs]
    records, k = [], 0
    for i, target in enumerate(targets):
        calls = []
        for x, _ in captured[i]:
            calls.append((x, grads[k].detach()))
            k += 1
        records.append((target, calls))
    mask = inputs.get("attention_mask")
    token_mask = (mask != 0).float() if torch.is_tensor(mask) and mask.dim() == 2 else None
    return BatchGradients(losses.detach(), counts, records, token_mask)


# --------------------------------------------------------------------------- Adam
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


def is_partitioned(param: torch.Tensor) -> bool:
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


def unwrap_optimizer(optimizer: Any) -> Any:
    """The torch optimizer inside accelerate's (or another) wrapper exposing ``.optimizer``."""
    return optimizer_chain(optimizer)[-1]


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
    if any(is_partitioned(params[n]) or hasattr(params[n], "_hp_mapping") for n in names):
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


# --------------------------------------------------------------------------- projected features
class GradientFeaturizer:
    """Projected (optionally Adam-preconditioned) per-sample gradients of a model's trainable linears."""

    def __init__(self, model: torch.nn.Module, projector: CountSketchProjector,
                 moments: dict[str, AdamMoment] | None = None):
        self.model = model
        self.projector = projector
        self.moments = moments
        self.targets = trainable_linears(model)

    @property
    def param_names(self) -> list[str]:
        return [n for t in self.targets for n in (t.weight_name, t.bias_name) if n is not None]

    def __call__(self, inputs: dict[str, Any], labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(features batch x proj_dim fp32, valid batch bool)``; invalid = no supervised token."""
        grads = per_sample_gradients(self.model, inputs, labels, self.targets)
        batch = labels.shape[0]
        out = torch.zeros(batch, self.projector.proj_dim, dtype=torch.float32, device=labels.device)
        for name, g in grads:
            if self.moments is not None:
                g = adam_direction(g, self.moments[name])
            self.projector.project_into(out, name, g)
        return out, grads.counts > 0


def normalise_rows(features: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Unit-length rows; invalid rows (and rows of norm 0) become NaN."""
    norms = features.norm(dim=1, keepdim=True)
    out = features / norms.clamp(min=1e-30)
    bad = ~valid | (norms.squeeze(1) == 0)
    out[bad] = float("nan")
    return out


def sharded_features(
    engine: Any,
    dataset: Any,
    indices: Sequence[int],
    batch_size: int,
    featurizer: GradientFeaturizer,
    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
    desc: str = "gradient features",
) -> torch.Tensor:
    """Unit-normalised projected features of ``dataset[indices]``, sharded over ranks.

    Batches are grouped by length and run on rank ``b % world`` by the engine's
    :meth:`~dataflex.scoring.engine.ScoringEngine.run_sharded`; every rank gets the result,
    aligned with ``indices`` (NaN rows for samples without a supervised token). With ``reduce``
    each batch's ``batch x proj_dim`` features are turned into per-sample values on the rank
    that computed them, so only those values travel (e.g. one score per sample); without it the
    projected features travel. Memory per rank: one batch's activations plus
    ``batch x (proj_dim + largest layer)``, whatever the number of samples.
    """
    indices = [int(i) for i in indices]
    lengths = engine.lengths(dataset)
    batches = length_batches([lengths[i] for i in indices], range(len(indices)), batch_size)
    model = engine.model

    def run(batch: list[int]) -> list[Any]:
        data = engine.collate(dataset, [indices[p] for p in batch])
        feats, valid = featurizer(engine.model_inputs(data), data["labels"])
        feats = normalise_rows(feats, valid)
        values = (reduce(feats) if reduce is not None else feats).detach().float().cpu()
        if values.dim() == 1:
            return values.tolist()  # one number per sample
        return [row.clone() for row in values]  # own storage each: a view would pickle the whole batch

    with eval_mode(model):
        results = engine.run_sharded(batches, run, desc)
    first = next((r[0] for r in results if r), None)
    if first is None:  # nothing to score
        shape = () if reduce is not None else (featurizer.projector.proj_dim,)
    else:
        shape = tuple(first.shape) if torch.is_tensor(first) else ()
    out = torch.full((len(indices), *shape), float("nan"), dtype=torch.float32)
    for batch, values in zip(batches, results):
        out[batch] = torch.stack(values) if shape else torch.tensor(values, dtype=torch.float32)
    return out
