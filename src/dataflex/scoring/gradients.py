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

:func:`per_sample_gradients` keeps every layer's inputs and output gradients until it returns.
The LESS features use :func:`stream_per_sample_gradients` instead, which recomputes each decoder
block in the backward and hands each layer's per-sample gradient on as soon as it is formed, so
its memory is a checkpointed training step's rather than a whole batch's activations.

Hooks versus ``torch.func``
---------------------------
Measured with ``python bench/less.py --torch-func`` (tiny demo model, CPU, 1 thread, batch 16,
600 samples of 28-253 tokens): per-sample gradients only, the linear-layer identity ran at 315
samples/s and ``torch.func.vmap(grad(functional_call(...)))`` at 237 (identity 1.33x faster).
vmap also needs surgery on a Hugging Face model: transformers' attention-mask helpers branch on
data (rejected under vmap), so the mask has to be dropped - exact only for right padding - and
PEFT/LLaMA-Factory's input-require-grads hook has to be removed. The identity works on the
model as the trainer holds it, so it is what is used here.

Adam preconditioning of the training features lives in :mod:`dataflex.scoring.optimizer_state`.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import torch

from .engine import Batch, eval_mode, is_partitioned
from .losses import supervised_logits, token_loss_sums
from .optimizer_state import AdamMoment, adam_direction
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
def _token_view(x: torch.Tensor, gy: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``batch x tokens x features`` fp32 views of a call's input and output gradient, the output
    gradient zeroed at padded positions."""
    batch = x.shape[0]
    x = x.reshape(batch, -1, x.shape[-1]).float()
    gy = gy.reshape(batch, -1, gy.shape[-1]).float()
    if mask is not None and mask.shape == gy.shape[:2]:
        gy = gy * mask.unsqueeze(-1)
    return x, gy


class _LayerSum:
    """One layer's per-sample weight / bias gradients, summed over its calls."""

    def __init__(self, target: LinearTarget):
        self.target = target
        self.weight: torch.Tensor | None = None
        self.bias: torch.Tensor | None = None

    def add(self, x: torch.Tensor, gy: torch.Tensor) -> None:
        if self.target.weight_name is not None:
            w = torch.bmm(gy.transpose(1, 2), x)  # batch x out x in
            self.weight = w if self.weight is None else self.weight + w
        if self.target.bias_name is not None:
            b = gy.sum(dim=1)
            self.bias = b if self.bias is None else self.bias + b

    def items(self) -> Iterator[tuple[str, torch.Tensor]]:
        if self.weight is not None:
            yield self.target.weight_name, self.weight.reshape(self.weight.shape[0], -1)
        if self.bias is not None:
            yield self.target.bias_name, self.bias


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

    @property
    def targets(self) -> list[LinearTarget]:
        return [target for target, _ in self._records]

    def subset(self, keep: Callable[[LinearTarget], bool]) -> "BatchGradients":
        """The same batch restricted to the layers ``keep`` accepts."""
        return BatchGradients(self.losses, self.counts, [r for r in self._records if keep(r[0])], self._mask)

    def layer_calls(self) -> Iterator[tuple[LinearTarget, Iterator[tuple[torch.Tensor, torch.Tensor]]]]:
        """Per layer, its calls' ``(inputs, output gradients)`` as ``batch x tokens x features`` fp32,
        output gradients at padded positions zeroed - what every per-sample quantity is built from."""
        for target, calls in self._records:
            yield target, (self._tokens(x, gy) for x, gy in calls)

    def _tokens(self, x: torch.Tensor, gy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return _token_view(x, gy, self._mask)

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        for target, calls in self.layer_calls():
            acc = _LayerSum(target)
            for x, gy in calls:
                acc.add(x, gy)
            yield from acc.items()

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


# --------------------------------------------------------------------------- streamed, recomputing
def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The model's checkpointable blocks (transformers' ``GradientCheckpointingLayer``), outermost only."""
    try:
        from transformers.modeling_layers import GradientCheckpointingLayer
    except ImportError:  # older transformers: no recomputation, streaming only
        return []
    layers, inside = [], set()
    for name, module in model.named_modules():
        if any(name.startswith(p) for p in inside):
            continue
        if isinstance(module, GradientCheckpointingLayer):
            layers.append(module)
            inside.add(name + ".")
    return layers


class _Stream:
    """Book-keeping of :func:`stream_per_sample_gradients`: which layer runs, and in which pass."""

    def __init__(self, n_targets: int):
        self.n_targets = n_targets
        self.reset()

    def reset(self) -> None:
        self.layer: int | None = None  # the checkpointed block running now (None: outside every block)
        self.recompute = False
        self.calls: dict[int, int] = {}  # target -> its calls so far in this run of the block
        self.runs: dict[int, int] = {}  # block -> times it ran (1: the forward, 2: the recompute)
        self.inputs: dict[tuple, torch.Tensor] = {}  # call -> its input, until its output gradient comes
        self.pending: dict[tuple, torch.Tensor] = {}  # call -> output gradient that came before its input
        self.expected = [0] * self.n_targets  # calls per target in the forward
        self.done = [0] * self.n_targets

    def key(self, i: int) -> tuple:
        k = self.calls.get(i, 0)
        self.calls[i] = k + 1
        return (self.layer, i, k)


@contextmanager
def _recomputed(layers: list[torch.nn.Module], state: _Stream) -> Iterator[None]:
    """Run each block under non-reentrant activation checkpointing, telling ``state`` which pass it is."""
    from torch.utils.checkpoint import checkpoint

    def wrap(idx: int, forward: Callable) -> Callable:
        def inner(*args, **kwargs):
            saved = (state.layer, state.recompute, state.calls)
            runs = state.runs.get(idx, 0)
            state.runs[idx] = runs + 1
            state.layer, state.recompute, state.calls = idx, runs > 0, {}
            try:
                return forward(*args, **kwargs)
            finally:
                state.layer, state.recompute, state.calls = saved

        def checkpointed(*args, **kwargs):
            # no early stop: the recompute must run the whole block, so every linear layer's input comes
            return checkpoint(inner, *args, use_reentrant=False, early_stop=False, **kwargs)
        return checkpointed

    patched = []
    try:
        for idx, layer in enumerate(layers):
            had_own = "forward" in layer.__dict__
            patched.append((layer, had_own, layer.forward))
            layer.forward = wrap(idx, layer.forward)
        yield
    finally:
        for layer, had_own, forward in patched:
            if had_own:
                layer.forward = forward
            else:
                del layer.forward


def stream_per_sample_gradients(
    model: torch.nn.Module,
    inputs: dict[str, Any],
    labels: torch.Tensor,
    targets: Sequence[LinearTarget],
    consume: Callable[[str, torch.Tensor], None],
    recompute: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-sample gradients of :func:`per_sample_gradients`, handed to ``consume(name, batch x
    numel)`` layer by layer during the backward instead of being kept; returns ``(losses, counts)``.

    With ``recompute`` every decoder block runs under activation checkpointing: the forward keeps
    only the blocks' inputs (as a training step with gradient checkpointing does), each block is
    run again when the backward reaches it, and the linear layers' inputs are taken from that second
    run. A layer's input is held only until its output gradient arrives, so at any moment the
    memory is one block's activations plus the blocks' inputs. A layer that never receives an
    output gradient (its output does not reach the loss) has gradient zero and is not handed on.
    """
    targets = list(targets)
    state = _Stream(len(targets))
    mask = inputs.get("attention_mask")
    token_mask = (mask != 0).float() if torch.is_tensor(mask) and mask.dim() == 2 else None
    sums: dict[int, _LayerSum] = {}
    anchor = torch.zeros((), device=labels.device, requires_grad=True)  # every output's gradient flows to it

    def finish(i: int) -> None:
        acc = sums.pop(i, None)
        if acc is not None:
            for name, grad in acc.items():
                consume(name, grad)

    def pair(key: tuple, x: torch.Tensor, gy: torch.Tensor) -> None:
        i = key[1]
        sums.setdefault(i, _LayerSum(targets[i])).add(*_token_view(x, gy, token_mask))
        state.done[i] += 1
        if state.done[i] == state.expected[i]:
            finish(i)

    def output_grad(key: tuple) -> Callable:
        def hook(gy):
            x = state.inputs.pop(key, None)
            if x is None:
                state.pending[key] = gy.detach()
            else:
                pair(key, x, gy.detach())
        return hook

    def hook_for(i: int) -> Callable:
        def hook(module, args, kwargs, output):
            x = args[0] if args else kwargs["input"]
            key = state.key(i)
            if state.recompute:  # the input now; the output's gradient is (or will be) on its way
                gy = state.pending.pop(key, None)
                if gy is None:
                    state.inputs[key] = x.detach()
                else:
                    pair(key, x.detach(), gy)
                return output + anchor
            state.expected[i] += 1
            if state.layer is None or not recompute:  # no second run: keep the input from this one
                state.inputs[key] = x.detach()
            output = output + anchor
            output.register_hook(output_grad(key))
            return output
        return hook

    handles = [t.module.register_forward_hook(hook_for(i), with_kwargs=True) for i, t in enumerate(targets)]
    layers = decoder_layers(model) if recompute else []
    try:
        with eval_mode(model), torch.enable_grad(), _recomputed(layers, state):
            logits, kept = supervised_logits(model, inputs, labels, on_retry=state.reset)
            loss_sums, counts = token_loss_sums(logits, kept)
            del logits
            losses = loss_sums / counts.clamp(min=1)
            total = losses.sum()
            if total.requires_grad:
                torch.autograd.grad(total, [anchor], allow_unused=True)
    finally:
        for h in handles:
            h.remove()
    if state.pending:
        raise RuntimeError("per-sample gradients: an output gradient arrived without its layer's input")
    for i in list(sums):  # layers some of whose calls got no output gradient: those calls add zero
        finish(i)
    return losses.detach(), counts


# --------------------------------------------------------------------------- projected features
class GradientFeaturizer:
    """Projected (optionally Adam-preconditioned) per-sample gradients of a model's trainable linears."""

    def __init__(self, model: torch.nn.Module, projector: CountSketchProjector,
                 moments: dict[str, AdamMoment] | None = None):
        self.model = model
        self.projector = projector
        self.moments = moments
        self.targets = trainable_linears(model)
        # recompute each block's activations in the backward (a training step's memory), except with
        # ZeRO-3 partitions, whose gathers are left to the plain forward
        self.recompute = not is_partitioned(model)

    @property
    def param_names(self) -> list[str]:
        return [n for t in self.targets for n in (t.weight_name, t.bias_name) if n is not None]

    def __call__(self, inputs: dict[str, Any], labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(features batch x proj_dim fp32, valid batch bool)``; invalid = no supervised token."""
        out = torch.zeros(labels.shape[0], self.projector.proj_dim, dtype=torch.float32, device=labels.device)

        def project(name: str, g: torch.Tensor) -> None:
            if self.moments is not None:
                g = adam_direction(g, self.moments[name])
            self.projector.project_into(out, name, g)

        _, counts = stream_per_sample_gradients(self.model, inputs, labels, self.targets, project,
                                                recompute=self.recompute)
        return out, counts > 0


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
    normalise: bool = True,
) -> torch.Tensor:
    """Unit-normalised projected features of ``dataset[indices]``, through the engine's sharded loop.

    Every rank gets the result, aligned with ``indices`` (NaN rows for samples without a
    supervised token; ``normalise=False`` keeps the projected gradients' own lengths, zero rows then). With ``reduce`` each batch's ``batch x proj_dim`` features are turned
    into per-sample values on the rank that computed them, so only those values travel (e.g. one
    score per sample, or a few: ``reduce`` returning ``batch x K`` gives an ``[N, K]`` result); without
    it the projected features travel. Memory per rank: one batch's
    activations plus ``batch x (proj_dim + largest layer)``, whatever the number of samples.
    """

    def run(batch: Batch) -> torch.Tensor:
        feats, valid = featurizer(batch.inputs, batch.labels)
        if normalise:
            feats = normalise_rows(feats, valid)
        return (reduce(feats) if reduce is not None else feats).detach().float()

    with eval_mode(engine.model):
        values = engine.map(dataset, indices, batch_size, run, desc, backward=True)
    if reduce is not None and values and torch.is_tensor(values[0]) and values[0].dim() == 1:
        return torch.stack(values)  # several values per sample (e.g. one per eval target): [N, K]
    if reduce is not None:
        return torch.tensor([float("nan") if v is None else float(v) for v in values], dtype=torch.float32)
    if not values:
        return torch.empty(0, featurizer.projector.proj_dim, dtype=torch.float32)
    return torch.stack(values)
