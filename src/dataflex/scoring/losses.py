"""Per-sample losses from logits: the one definition every scorer and the weighted training loss share.

A sample's loss is the mean token cross-entropy over its supervised tokens (labels != -100,
next-token shifted) - the number the model reports for that sample alone at batch size 1.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

IGNORE_INDEX = -100


def token_loss_sums(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed fp32 cross-entropy and count of the supervised targets of each row.

    ``targets[:, j]`` is the label ``logits[:, j]`` predicts (already shifted); -100 is ignored.
    Only the supervised positions are converted to fp32, so a large vocabulary does not cost a
    full fp32 copy of the logits. Differentiable with respect to ``logits``.
    """
    mask = targets != IGNORE_INDEX
    counts = mask.sum(dim=1)
    sums = torch.zeros(targets.shape[0], dtype=torch.float32, device=logits.device)
    if mask.any():
        rows = mask.nonzero(as_tuple=True)[0]
        token_loss = torch.nn.functional.cross_entropy(logits[mask].float(), targets[mask].to(logits.device),
                                                       reduction="none")
        sums = sums.index_add(0, rows, token_loss)
    return sums, counts


def token_losses(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token losses of full (unshifted) ``logits`` [B, T, V] and ``labels`` [B, T].

    Returns ``(losses [B, T-1] fp32, 0 where unsupervised; mask [B, T-1] bool)``.
    """
    logits, targets = logits[:, :-1], labels[:, 1:].to(logits.device)
    mask = targets != IGNORE_INDEX
    out = torch.zeros(targets.shape, dtype=torch.float32, device=logits.device)
    if mask.any():
        out = out.masked_scatter(mask, torch.nn.functional.cross_entropy(
            logits[mask].float(), targets[mask], reduction="none"))
    return out, mask


def sample_loss_sums(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample summed token loss and supervised-token count of full logits and unshifted labels."""
    return token_loss_sums(logits[:, :-1], labels[:, 1:])


def supervised_logits(model: torch.nn.Module, inputs: dict[str, Any], labels: torch.Tensor,
                      on_retry: Callable[[], None] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward ``inputs``, with logits only at positions whose next token is supervised in some row.

    Uses the ``logits_to_keep`` argument of transformers' causal LMs, so the vocabulary projection
    runs on the response tokens only (with a 150k vocabulary that is most of the logits' memory);
    losses and gradients are the same as with full logits. Models without the argument get full
    logits, cut here (``on_retry`` runs before the second forward, e.g. to drop what hooks saw).
    Returns ``(logits, targets)``, aligned: ``targets[:, j]`` is the label ``logits[:, j]`` predicts.
    """
    shifted = labels[:, 1:]
    keep = (shifted != IGNORE_INDEX).any(dim=0).nonzero().flatten()
    if keep.numel() == 0:  # nothing supervised: a plain forward (every rank must still run one)
        logits = model(**inputs).logits
        return logits[:, :-1], shifted
    try:
        logits = model(**inputs, logits_to_keep=keep).logits
    except TypeError as err:
        if "logits_to_keep" not in str(err):
            raise
        if on_retry is not None:
            on_retry()
        logits = model(**inputs).logits
    if logits.shape[1] != keep.numel():  # the argument was ignored: full logits
        logits = logits[:, keep]
    return logits, shifted[:, keep]


def supervised_loss_sums(model: torch.nn.Module, inputs: dict[str, Any], labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward ``inputs``; each row's summed token loss and supervised-token count."""
    return token_loss_sums(*supervised_logits(model, inputs, labels))


def mean_losses(sums: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """float64 mean loss per row; NaN for rows without a supervised token."""
    return (sums.double() / counts.clamp(min=1)).masked_fill(counts == 0, float("nan"))
