"""The shared scoring engine: batched, length-grouped, sharded over ranks, reassembled in index order.

Every per-sample quantity DataFlex computes with the model - losses, hidden-state embeddings,
gradient features, zeroth-order probes, an eval-set gradient - goes through one loop,
:meth:`ScoringEngine.map`:

* the samples are grouped into batches of similar length (sorted by length, longest first, so
  an out-of-memory shows up at once) and padded with the training collator;
* batch ``b`` runs on rank ``b % world_size``; every rank runs the same number of batches (ranks
  short of one repeat a batch and drop its result), because DeepSpeed ZeRO-3 needs every rank
  in every forward;
* every batch is collated, then the ranks meet at a fence (:mod:`dataflex.dist.agreement`)
  before any rank starts the batch's forward, so a failure in collation on one rank (a
  malformed row, an out-of-memory outside the model) stops every rank before the next forward;
  a failure inside a forward is carried to the next fence, or - with partitioned (ZeRO-3)
  weights, where peers may be waiting inside the forward's own collectives - ends the process at
  once so torchrun stops the others;
* the per-sample results of every rank are gathered, so every rank gets all of them, aligned
  with the indices asked for;
* the token passes a map costs are added to the engine's :class:`DecisionWork` (the whole run's
  scoring work, the same number on every rank; see there).

The model runs in eval mode (dropout off, LoRA dropout included) and its training mode is
restored afterwards.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import torch

from ..dist.agreement import Agreement
from .losses import mean_losses, supervised_loss_sums
from .optimizer_state import is_partitioned_param

logger = logging.getLogger("dataflex")


def dataset_lengths(dataset: Any) -> list[int]:
    """Token length of every row, in the dataset's own (possibly index-mapped) order.

    Arrow-backed ``datasets.Dataset``: the lengths of the underlying table's ``input_ids`` lists,
    mapped through the dataset's index mapping (set by ``select`` / ``shuffle`` /
    ``train_test_split``). That reads two private attributes, ``data`` and ``_indices``; the public
    route (``with_format("arrow").iter``) gives the same numbers 200x slower on an index-mapped set
    (0.44 s vs 2 ms for 80k rows), and is the fallback. ``tests/unit/scoring/test_scoring.py`` checks both agree.
    """
    try:
        import numpy as np
        import pyarrow.compute as pc

        lengths = pc.list_value_length(dataset.data.column("input_ids")).to_numpy(zero_copy_only=False)
        mapping = getattr(dataset, "_indices", None)
        if mapping is not None:
            lengths = lengths[np.asarray(mapping.column(0).to_numpy(zero_copy_only=False), dtype=np.int64)]
        return lengths.astype(np.int64).tolist()
    except Exception:  # noqa: BLE001 - other dataset types
        return public_dataset_lengths(dataset)


def public_dataset_lengths(dataset: Any) -> list[int]:
    try:
        import pyarrow.compute as pc

        out: list[int] = []
        for table in dataset.with_format("arrow").iter(batch_size=10_000):
            out.extend(pc.list_value_length(table["input_ids"]).to_pylist())
        return out
    except Exception:  # noqa: BLE001 - not a datasets.Dataset
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


@contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


@dataclass
class Batch:
    """One collated batch of :meth:`ScoringEngine.map`."""

    positions: list[int]  # positions in the ``indices`` map was given
    inputs: dict[str, Any]  # model keyword arguments (no labels), on the engine's device
    labels: torch.Tensor
    padding: bool  # a count-equalising repeat: run it (collectives), its result is dropped


@dataclass
class DecisionWork:
    """The token passes a run's own decisions cost: every token of every row scored, once per pass.

    ``forward_tokens``: tokens that went through a scoring forward; ``backward_tokens``: tokens whose
    loss was also back-propagated (per-sample gradients, an eval gradient). A row counts with its
    non-padding length (``input_ids``), once per :meth:`ScoringEngine.map` that scores it, summed over
    every rank's batches: the count-equalising repeats of a multi-process run are not work the method
    asks for and are left out, so one process and several give the same total, and every rank holds it
    (each knows every batch's rows). Recomputation inside a backward (``recompute``) is not counted, as
    training's own gradient checkpointing is not counted in its trained tokens.

    Passes that a rank makes on its own training micro-batches (DoReMi's reference model) are added with
    :meth:`add_local` and summed over the ranks by :meth:`settle`, which every rank calls at the same
    points (a checkpoint, the end of training) once a rank-local pass was announced with ``local = True``.
    """

    forward_tokens: int = 0
    backward_tokens: int = 0
    local: bool = False  # some passes are counted per rank (set on every rank alike, before training)
    pending_forward: int = 0  # this rank's forward tokens not yet summed over the ranks

    def add(self, tokens: int, backward: bool) -> None:
        self.forward_tokens += int(tokens)
        if backward:
            self.backward_tokens += int(tokens)

    def add_local(self, tokens: int) -> None:
        """A forward over ``tokens`` of this rank's own batch (summed over the ranks at :meth:`settle`)."""
        self.pending_forward += int(tokens)

    def settle(self, agreement: Agreement) -> None:
        """Add every rank's pending forward tokens to the total (a collective when ``local``)."""
        if not self.local:
            return
        total = agreement.all_reduce("decision work: the ranks' own passes", torch.tensor([self.pending_forward]))
        self.forward_tokens += int(round(float(total[0])))
        self.pending_forward = 0

    def as_dict(self) -> dict[str, int]:
        return {"forward_tokens": self.forward_tokens, "backward_tokens": self.backward_tokens}

    def load(self, state: dict[str, Any] | None) -> None:
        """Continue from a checkpoint's counts (a checkpoint written before they existed: from 0)."""
        state = state or {}
        self.forward_tokens = int(state.get("forward_tokens", 0))
        self.backward_tokens = int(state.get("backward_tokens", 0))


def is_partitioned(model: torch.nn.Module) -> bool:
    """True when the weights are DeepSpeed ZeRO-3 partitions (forwards then run collectives)."""
    return any(is_partitioned_param(p) for p in model.parameters())


class ScoringEngine:
    """Scores samples of a tokenized dataset with ``model``; shared by every scoring component."""

    def __init__(
        self,
        model: torch.nn.Module,
        collator: Callable[[list[dict]], dict[str, Any]],
        device: Any = None,
        agreement: Agreement | None = None,
        show_progress: bool = True,
        work: DecisionWork | None = None,
    ):
        self.model = model
        self.collator = collator
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.agreement = agreement or Agreement()
        self.rank = self.agreement.rank
        self.world_size = self.agreement.world_size
        self.show_progress = show_progress and self.rank == 0
        self.partitioned = is_partitioned(model)
        self._lengths: dict[int, list[int]] = {}
        self.forward_passes = 0  # this rank's batches in the last map (for benchmarks and tests)
        self.work = work if work is not None else DecisionWork()  # every map's token passes, all ranks

    # -------------------------------------------------------------- plumbing
    def lengths(self, dataset: Any) -> list[int]:
        key = id(dataset)
        if key not in self._lengths:
            self._lengths[key] = dataset_lengths(dataset)
        return self._lengths[key]

    def collate(self, dataset: Any, ids: Sequence[int]) -> dict[str, Any]:
        batch = self.collator([dataset[int(i)] for i in ids])
        return {k: (v.to(self.device) if torch.is_tensor(v) else v) for k, v in batch.items()}

    def prepare(self, dataset: Any, ids: Sequence[int], positions: list[int], padding: bool) -> Batch:
        data = self.collate(dataset, ids)
        labels = data.pop("labels")
        data["use_cache"] = False
        return Batch(positions, data, labels, padding)

    def batches(self, dataset: Any, indices: Sequence[int], batch_size: int) -> list[list[int]]:
        lengths = self.lengths(dataset)
        return length_batches([lengths[int(i)] for i in indices], range(len(indices)), batch_size)

    # -------------------------------------------------------------- the loop
    def map(self, dataset: Any, indices: Sequence[int], batch_size: int, fn: Callable[[Batch], Any],
            desc: str, backward: bool = False) -> list[Any]:
        """``fn`` on every batch of ``dataset[indices]``; one result per index, in the order of ``indices``.

        ``fn(batch)`` returns one value per sample of the batch (a sequence or a tensor whose first
        dimension is the batch). Tensors are moved to the CPU. Runs on every rank (see the module
        docstring for the sharding and failure rules). ``backward``: ``fn`` also back-propagates each
        row's loss once (counted in :attr:`work`); without it, ``fn`` is one forward per row.
        """
        indices = [int(i) for i in indices]
        batches = self.batches(dataset, indices, batch_size)
        agree, world, rank = self.agreement, self.world_size, self.rank
        per_rank = -(-len(batches) // world) if batches else 0
        results: dict[int, list[Any]] = {}
        error: str | None = None
        failed_at = ""  # where this rank's error happened (a later fence reports it)
        progress = self._progress(per_rank, desc)
        self.forward_passes = 0
        try:
            for k in range(per_rank):
                b = rank + k * world
                padding = b >= len(batches)
                if padding:
                    b = 0
                where = f"{desc}, batch {k + 1}/{per_rank}"
                prepared = None
                if error is None:
                    prepared, error = agree.attempt(
                        lambda: self.prepare(dataset, [indices[p] for p in batches[b]], batches[b], padding), where)
                    failed_at = where
                agree.fence(failed_at if error else where, error)  # nobody starts this forward while a rank has failed
                if self.partitioned:
                    with agree.section(where, fenced=True):
                        out = fn(prepared)
                else:
                    out, error = agree.attempt(lambda: fn(prepared), where)
                    failed_at = where
                self.forward_passes += 1
                if not padding and error is None:
                    results[b] = _to_cpu(out, len(batches[b]))
                if progress is not None:
                    progress.update(1)
        finally:
            if progress is not None:
                progress.close()
        parts = agree.gather(failed_at if error else f"{desc}: gathering results", results, error)
        merged: dict[int, list[Any]] = {}
        for part in parts:
            merged.update(part)
        lengths = self.lengths(dataset)
        self.work.add(sum(lengths[i] for i in indices), backward)
        out: list[Any] = [None] * len(indices)
        for b, batch in enumerate(batches):
            for p, value in zip(batch, merged[b]):
                out[p] = value
        return out

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
        model = self.model

        def score(batch: Batch) -> torch.Tensor:
            return mean_losses(*supervised_loss_sums(model, batch.inputs, batch.labels))

        with eval_mode(model), torch.no_grad():
            values = self.map(dataset, indices, batch_size, score, desc)
        return torch.tensor([float("nan") if v is None else float(v) for v in values], dtype=torch.float64)


def _to_cpu(out: Any, n: int) -> list[Any]:
    """Per-sample values of a batch result, on the CPU, each with its own storage."""
    if torch.is_tensor(out):
        out = out.detach().cpu()
        if out.dim() == 1:
            return out.tolist()
        return [row.clone() for row in out]  # a view would pickle the whole batch
    out = list(out)
    if len(out) != n:
        raise RuntimeError(f"a scoring function returned {len(out)} values for a batch of {n}")
    return [v.detach().cpu().clone() if torch.is_tensor(v) else v for v in out]
