"""The training loss of a DataFlex step: per-sample weights, and the signals a mode's loss hook reads.

The trainer's ``compute_loss`` comes here (:func:`compute_loss`). When the batch carries weights
other than 1, or the mode has a loss hook, the model's own loss is computed with its logits; the
per-sample loss sums are taken from them, the mode's hook sees one :class:`LossSignals`, and
the weighted loss is the model's loss plus :func:`weight_correction`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from ..scoring.losses import sample_loss_sums
from .base import DOMAIN_KEY, INDEX_KEY, WEIGHT_KEY


@dataclass
class LossSignals:
    """What the training forward of one micro-batch tells a mode's loss hook (this rank's rows)."""

    ids: torch.Tensor  # training-set rows
    domains: torch.Tensor | None  # domain of each row (mix), else None
    sums: torch.Tensor  # [n] summed token loss per row (with grad)
    counts: torch.Tensor  # [n] supervised tokens per row
    outputs: Any  # the model's outputs (logits, hidden states when asked for)
    inputs: dict[str, Any]  # the forward's inputs
    labels: torch.Tensor
    logits: torch.Tensor
    weights: torch.Tensor | None  # the batch's loss weights so far (None: all 1)


def compute_loss(mode: Any, model: Any, inputs: dict[str, Any], return_outputs: bool, num_items_in_batch: Any,
                 default: Callable[..., Any]) -> Any:
    """``Trainer.compute_loss`` for ``mode`` (``default``: the parent trainer's)."""
    ids = inputs.pop(INDEX_KEY, None)
    weights = inputs.pop(WEIGHT_KEY, None)
    domains = inputs.pop(DOMAIN_KEY, None)
    if ids is None:  # not a training batch of ours (evaluation)
        return default(model, inputs, return_outputs, num_items_in_batch)
    hook = mode.loss_hook()
    if weights is not None and not bool((weights != 1).any()):
        weights = None  # all exactly 1: the correction is exactly 0, so skip the per-sample losses it needs
    if weights is None and hook is None:
        return default(model, inputs, return_outputs, num_items_in_batch)
    labels = inputs["labels"]
    if hook is not None:
        inputs = mode.loss_inputs(inputs)
    loss, outputs = default(model, inputs, True, num_items_in_batch)
    logits = getattr(outputs, "logits", None)
    if logits is None:
        raise RuntimeError("the training forward returned no logits (a fused loss such as the liger kernel?); "
                           "per-sample weights need them")
    sums, counts = sample_loss_sums(logits, labels)
    if hook is not None:
        weights = hook(LossSignals(ids, domains, sums, counts, outputs, inputs, labels, logits, weights))
    if weights is not None:
        loss = loss + weight_correction(mode.ctx.trainer, weights, sums, counts, num_items_in_batch)
    return (loss, outputs) if return_outputs else loss


def weight_correction(trainer: Any, weights: torch.Tensor, sums: torch.Tensor, counts: torch.Tensor,
                      num_items_in_batch: Any) -> torch.Tensor:
    """Σ_i (w_i − 1) S_i / D, scaled as the trainer scaled the model's own loss.

    The model's loss is Σ_i S_i / D (D: the step's supervised tokens over all micro-batches and
    ranks when the model takes ``num_items_in_batch``, else this micro-batch's), so the sum is
    the weighted loss Σ_i w_i S_i / D; with weights exactly 1 the correction is exactly 0.
    """
    w = weights.to(sums.device, torch.float32)
    accepts = bool(getattr(trainer, "model_accepts_loss_kwargs", False))
    if accepts and num_items_in_batch is not None:
        denominator = num_items_in_batch.to(sums.device) if torch.is_tensor(num_items_in_batch) else num_items_in_batch
    else:
        denominator = counts.sum().clamp(min=1).to(sums.device)
    correction = ((w - 1.0) * sums).sum() / denominator
    targs = trainer.args
    if (targs.average_tokens_across_devices and (accepts or trainer.compute_loss_func is not None)
            and num_items_in_batch is not None):
        correction = correction * (trainer.accelerator.num_processes if targs.n_gpu <= 1 else targs.n_gpu)
    return correction
