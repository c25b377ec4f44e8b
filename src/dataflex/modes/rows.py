"""Scheduled rows: training on the rows a mode's round decides for each optimizer step.

The modes that decide which rows each step sees (select, mix, reorder) compose a
:class:`ScheduledRows`. It hands the trainer a loader of *slots* (``step * GA + micro``) that
carry no data, so every rank iterates the same slots through ``accelerator.prepare``; when a step
starts, its slots are turned into this rank's micro-batches from the round's rows for the step.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from ..schedule import rank_micro_batch
from .base import INDEX_KEY, ModeContext


def _first(batch: list) -> Any:
    return batch[0]


class ScheduledRows:
    """The training loader and the step's batches of a mode whose round decides the rows.

    ``rows(step)``: the ``G`` rows of an optimizer step (in the order ranks split them);
    ``planned_steps()``: the run's optimizer steps; ``add(batch)``: what the mode adds to each
    collated micro-batch; ``before(batches)``: what it does with the step's micro-batches before
    they are trained on.
    """

    def __init__(self, ctx: ModeContext, rows: Callable[[int], list[int]], planned_steps: Callable[[], int],
                 add: Callable[[dict[str, Any]], None] | None = None,
                 before: Callable[[list[dict[str, Any]]], None] | None = None):
        self.ctx = ctx
        self.rows = rows
        self.planned_steps = planned_steps
        self.add = add
        self.before = before

    def train_loader(self, default: Callable[[], Any]) -> Any:
        from torch.utils.data import DataLoader

        slots = range(self.planned_steps() * self.ctx.ga)
        return DataLoader(slots, batch_size=1, shuffle=False, collate_fn=_first)

    def num_examples(self, dataloader: Any, default: Callable[[Any], int]) -> int:
        return self.planned_steps() * self.ctx.global_batch

    def step_batches(self, epoch_iterator: Any, num_batches: int, device: Any, default: Callable) -> Any:
        slots = []
        for _ in range(num_batches):
            try:
                slots.append(next(epoch_iterator))
            except StopIteration:
                break
        if not slots:
            return default(iter(()), 0, device)
        step = slots[0] // self.ctx.ga
        global_step = self.ctx.step
        if step != global_step:
            raise RuntimeError(f"DataFlex: slot for step {step} arrived at global step {global_step}")
        rows = self.rows(step)
        batches = [self.batch(rows, slot) for slot in slots]
        if self.before is not None:
            self.before(batches)
        return default(iter(batches), len(batches), device)

    def batch(self, step_rows: list[int], slot: int) -> dict[str, Any]:
        """This rank's share of micro-batch ``slot`` of a step with rows ``step_rows``, collated."""
        ctx = self.ctx
        ids = rank_micro_batch(step_rows, slot % ctx.ga, ctx.rank, ctx.per_device, ctx.world)
        batch = ctx.collator([ctx.train[i] for i in ids])
        batch[INDEX_KEY] = torch.tensor(ids, dtype=torch.long)
        if self.add is not None:
            self.add(batch)
        return batch
