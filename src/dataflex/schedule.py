"""The dynamic-selection schedule: which optimizer steps train on which stretch of samples.

Pure Python on purpose (no torch, no LLaMA-Factory) so every rule here is unit-tested directly.

Vocabulary
----------
* ``G`` (global batch) = per_device_train_batch_size x gradient_accumulation_steps x world_size:
  the number of samples one optimizer step consumes over all ranks.
* A *cycle* is ``warmup_step`` steps on a random draw, then ``update_times`` selections of
  ``update_step`` steps each. Its length is ``warmup_step + update_step * update_times``.
* Total optimizer steps = ``max_steps`` when it is > 0, else ``ceil(num_train_epochs * cycle)``.
  Cycles repeat until the total is reached; the last stretch is cut short when the total ends
  inside it (and asks the selector only for the samples it will actually train on).
* A *stretch* is one run of consecutive steps fed by one draw: warm-up (random) or a selection.
  A selection stretch starting at global step ``s`` is selected when ``s`` optimizer steps are
  done, i.e. with the model as it is after the last step before the boundary.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass
from typing import Sequence


@dataclass(frozen=True)
class Stretch:
    """Consecutive optimizer steps ``[start_step, start_step + num_steps)`` fed by one draw."""

    kind: str  # "warmup" or "select"
    start_step: int
    num_steps: int
    cycle: int
    selection: int | None = None  # 0-based number of this selection over the whole run
    t: int | None = None  # 0-based number of this selection inside its cycle

    @property
    def end_step(self) -> int:
        return self.start_step + self.num_steps

    @property
    def is_selection(self) -> bool:
        return self.kind == "select"


@dataclass(frozen=True)
class Schedule:
    warmup_step: int
    update_step: int
    update_times: int
    global_batch: int
    total_steps: int
    stretches: tuple[Stretch, ...]

    @classmethod
    def build(
        cls,
        warmup_step: int,
        update_step: int,
        update_times: int,
        global_batch: int,
        num_train_epochs: float = 1.0,
        max_steps: int = -1,
    ) -> "Schedule":
        for name, value in (("warmup_step", warmup_step), ("update_step", update_step), ("update_times", update_times)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
        if update_times > 0 and update_step == 0:
            raise ValueError(f"update_step must be >= 1 when update_times > 0, got update_step=0, update_times={update_times}")
        if global_batch < 1:
            raise ValueError(f"global batch must be >= 1, got {global_batch}")
        cycle_len = warmup_step + update_step * update_times
        if cycle_len == 0:
            raise ValueError("warmup_step + update_step * update_times must be >= 1 (the schedule has no steps)")
        if max_steps is not None and max_steps > 0:
            total = int(max_steps)
        else:
            if num_train_epochs <= 0:
                raise ValueError(f"num_train_epochs must be > 0, got {num_train_epochs}")
            # the small tolerance keeps e.g. 1.1 * 10 = 11.000000000000002 at 11 steps
            total = max(1, math.ceil(num_train_epochs * cycle_len - 1e-9))

        stretches: list[Stretch] = []
        step, cycle, selection = 0, 0, 0
        while step < total:
            if warmup_step > 0:
                n = min(warmup_step, total - step)
                stretches.append(Stretch("warmup", step, n, cycle))
                step += n
            for t in range(update_times):
                if step >= total:
                    break
                n = min(update_step, total - step)
                stretches.append(Stretch("select", step, n, cycle, selection, t))
                step += n
                selection += 1
            cycle += 1
        return cls(warmup_step, update_step, update_times, global_batch, total, tuple(stretches))

    @property
    def cycle_length(self) -> int:
        return self.warmup_step + self.update_step * self.update_times

    @property
    def selections(self) -> list[Stretch]:
        return [s for s in self.stretches if s.is_selection]

    @property
    def num_selections(self) -> int:
        return len(self.selections)

    def stretch_at(self, step: int) -> Stretch:
        """The stretch that optimizer step ``step`` (0-based) belongs to."""
        if not 0 <= step < self.total_steps:
            raise IndexError(f"step {step} is outside the schedule [0, {self.total_steps})")
        starts = [s.start_step for s in self.stretches]
        return self.stretches[bisect.bisect_right(starts, step) - 1]

    def samples_for(self, stretch: Stretch) -> int:
        """How many training-set indices the draw for ``stretch`` must return."""
        return self.global_batch * stretch.num_steps

    def describe(self) -> str:
        sel = self.selections
        at = ", ".join(str(s.start_step) for s in sel[:8]) + (", ..." if len(sel) > 8 else "")
        return (
            f"{self.total_steps} optimizer steps x {self.global_batch} samples; "
            f"cycle = {self.warmup_step} warm-up + {self.update_times} x {self.update_step} selected steps; "
            f"{len(sel)} selection(s) at step(s) [{at}]"
        )


def rank_micro_batch(step_indices: Sequence[int], micro: int, rank: int, per_device: int, world_size: int) -> list[int]:
    """The indices rank ``rank`` trains on in micro-batch ``micro`` of one optimizer step.

    ``step_indices`` holds the ``G`` indices of the step. Micro-batch ``m`` covers the slice
    ``[m * per_device * world_size, (m + 1) * per_device * world_size)``, of which rank ``r``
    takes the ``r``-th block of ``per_device`` indices - the same split a distributed sampler makes.
    """
    chunk = per_device * world_size
    start = micro * chunk + rank * per_device
    return list(step_indices[start : start + per_device])
