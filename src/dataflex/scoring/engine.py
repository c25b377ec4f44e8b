"""The shared scoring engine: batched, length-grouped, sharded over ranks, gathered in index order.

Selectors ask it for per-sample quantities of training or eval samples (losses now; gradient
features and zeroth-order probes build on the same batching and sharding). Rules it keeps:

* Batches group samples of similar length (sorted by length, longest first so an
  out-of-memory shows up at once) and pad with the training collator.
* Batch ``b`` runs on rank ``b % world_size``. Every rank runs the same number of forward passes
  (ranks short of a batch repeat one and drop the result) - DeepSpeed ZeRO-3 needs all ranks in
  every forward.
* A failure on any rank is gathered with the results and raised on every rank with the original
  message, so no rank is left waiting in a collective.
* The model runs in eval mode (dropout off, LoRA dropout included) without gradients where
  none are needed, and its training mode is restored afterwards.
"""

from __future__ import annotations

import logging
import os
import traceback
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Sequence

import torch

from ..errors import SelectionError
from .distributed import all_gather_object

logger = logging.getLogger("dataflex")

IGNORE_INDEX = -100
FAULT_ENV = "DATAFLEX_TEST_FAIL_SCORING"  # test-only: "RANK" makes that rank's scoring raise


def dataset_lengths(dataset: Any) -> list[int]:
    """Token length of every row (fast path for Arrow-backed ``datasets.Dataset``).

    The fast path reads the lengths of the underlying Arrow table and maps them through the
    dataset's index mapping (set by ``select``, ``shuffle``, ``train_test_split``), so row ``i`` of
    the result is row ``i`` of the dataset as indexed.
    """
    try:
        import numpy as np
        import pyarrow.compute as pc

        lengths = pc.list_value_length(dataset.data.column("input_ids")).to_numpy(zero_copy_only=False)
        mapping = getattr(dataset, "_indices", None)
        if mapping is not None:
            lengths = lengths[np.asarray(mapping.column(0).to_numpy(zero_copy_only=False), dtype=np.int64)]
        return lengths.astype(np.int64).tolist()
    except Exception:  # noqa: BLE001 - any other dataset type
        return [len(dataset[i]["input_ids"]) for i in range(len(dataset))]


def length_batches(lengths: Sequence[int], positions: Sequence[int], batch_size: int) -> list[list[int]]:
    """Split ``positions`` into batches of similar length, longest first.

    ``lengths[p]`` is the length of position ``p``. Ties keep the positions' order, so the
    batching is deterministic.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    order = sorted(positions, key=lambda p: (-lengths[p], p))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def token_loss_sums(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed fp32 cross-entropy and count of the supervised targets of each row.

    ``targets[:, j]`` is the label ``logits[:, j]`` predicts (already shifted); -100 is ignored.
    Only the supervised positions are converted to fp32, so a large vocabulary does not cost a
    full fp32 copy of the logits.
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


@contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


class ScoringEngine:
    """Scores samples of a tokenized dataset with ``model``; shared by every scoring selector."""

    def __init__(
        self,
        model: torch.nn.Module,
        collator: Callable[[list[dict]], dict[str, Any]],
        device: Any = None,
        rank: int = 0,
        world_size: int = 1,
        show_progress: bool = True,
    ):
        self.model = model
        self.collator = collator
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.rank = rank
        self.world_size = world_size
        self.show_progress = show_progress and rank == 0
        self._lengths: dict[int, list[int]] = {}
        self.forward_passes = 0  # this rank's forwards in the last call (for benchmarks/tests)
        self.padding = False  # True while run_sharded runs a padding batch whose result is dropped

    # -------------------------------------------------------------- plumbing
    def lengths(self, dataset: Any) -> list[int]:
        key = id(dataset)
        if key not in self._lengths:
            self._lengths[key] = dataset_lengths(dataset)
        return self._lengths[key]

    def collate(self, dataset: Any, ids: Sequence[int]) -> dict[str, Any]:
        batch = self.collator([dataset[int(i)] for i in ids])
        return {k: (v.to(self.device) if torch.is_tensor(v) else v) for k, v in batch.items()}

    def model_inputs(self, batch: dict[str, Any]) -> dict[str, Any]:
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        inputs["use_cache"] = False
        return inputs

    def run_sharded(
        self, batches: list[list[int]], fn: Callable[[list[int]], list[Any]], desc: str
    ) -> list[list[Any]]:
        """Run ``fn`` on every batch, each on rank ``b % world``; return all results, in batch order.

        ``fn(batch)`` returns one value per sample of the batch. Results of every rank are
        gathered, so every rank gets the full list.
        """
        world, rank = self.world_size, self.rank
        per_rank = -(-len(batches) // world) if batches else 0
        mine = list(range(rank, len(batches), world))
        results: dict[int, list[Any]] = {}
        error = None
        self.forward_passes = 0
        try:
            if os.environ.get(FAULT_ENV) == str(rank):
                raise RuntimeError(f"injected scoring fault on rank {rank}")
            progress = self._progress(per_rank, desc)
            for k in range(per_rank):
                if k < len(mine):
                    results[mine[k]] = fn(batches[mine[k]])
                elif batches:  # keep the number of forwards equal on every rank; result dropped
                    self.padding = True
                    try:
                        fn(batches[0])
                    finally:
                        self.padding = False
                self.forward_passes += 1
                if progress is not None:
                    progress.update(1)
            if progress is not None:
                progress.close()
        except Exception as err:  # noqa: BLE001 - gathered and raised on every rank below
            error = f"{type(err).__name__}: {err}"
            logger.error("[DataFlex] scoring failed on rank %d:\n%s", rank, traceback.format_exc())
        gathered = all_gather_object((error, results))
        for r, (err, _) in enumerate(gathered):
            if err:
                raise SelectionError(f"scoring failed on rank {r}: {err}")
        merged: dict[int, list[Any]] = {}
        for _, part in gathered:
            merged.update(part)
        return [merged[b] for b in range(len(batches))]

    def _progress(self, total: int, desc: str):
        if not self.show_progress or total == 0:
            return None
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=f"[DataFlex] {desc}", unit="batch", leave=False)

    # -------------------------------------------------------------- losses
    def losses(self, dataset: Any, indices: Sequence[int], batch_size: int = 16, desc: str = "scoring losses") -> torch.Tensor:
        """Mean token cross-entropy over each sample's supervised tokens (labels != -100).

        Equals the loss the model reports for the sample alone at batch size 1. Samples without
        a supervised token get NaN. Returns float64, aligned with ``indices``.
        """
        indices = [int(i) for i in indices]
        lengths = self.lengths(dataset)
        batches = length_batches([lengths[i] for i in indices], range(len(indices)), batch_size)
        model = self.model

        def score(batch: list[int]) -> list[float]:
            data = self.collate(dataset, [indices[p] for p in batch])
            sums, counts = supervised_loss_sums(model, self.model_inputs(data), data["labels"])
            values = (sums.double() / counts.clamp(min=1)).masked_fill(counts == 0, float("nan"))
            return values.cpu().tolist()

        with eval_mode(model), torch.no_grad():
            results = self.run_sharded(batches, score, desc)
        out = torch.full((len(indices),), float("nan"), dtype=torch.float64)
        for batch, values in zip(batches, results):
            out[batch] = torch.tensor(values, dtype=torch.float64)
        return out
