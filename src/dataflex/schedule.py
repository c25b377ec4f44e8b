"""The schedule: how many optimizer steps a run has, and which steps each draw of rows feeds.

Pure Python on purpose (no torch, no LLaMA-Factory) so every rule here is unit-tested directly.

Vocabulary
----------
* ``G`` (global batch) = per_device_train_batch_size x gradient_accumulation_steps x world_size:
  the number of rows one optimizer step consumes over all ranks.
* A *stretch* is a run of consecutive steps fed by one draw of ``G x steps`` rows:
  ``warmup`` (a seeded random draw; in mix mode the initial proportions), ``update`` (a
  decision: a selection, or a mixture update), or ``hold`` (mix mode after its last update:
  more rows at the last proportions, no decision).
* Selection (``dynamic_select``) repeats *cycles*: ``warmup_step`` warm-up steps, then
  ``update_times`` selections of ``update_step`` steps (``update_times: -1``: selections until
  the end, one cycle). Mixing (``dynamic_mix``) has one warm-up, ``update_times`` updates
  (``-1``: until the end), then holds.
* An update stretch starting at global step ``s`` is decided when ``s`` optimizer steps are done,
  i.e. with the model as it is after the last step before the boundary. The last stretch is cut
  short when the total ends inside it, and its draw returns only the rows trained on.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass, field
from typing import Sequence

HOLD_STEPS = 100  # length of a hold stretch when update_step gives none


@dataclass(frozen=True)
class Stretch:
    """Consecutive optimizer steps ``[start_step, start_step + num_steps)`` fed by one draw."""

    kind: str  # "warmup", "update" or "hold"
    start_step: int
    num_steps: int
    cycle: int
    number: int | None = None  # 0-based number of this update over the whole run
    t: int | None = None  # 0-based number of this update inside its cycle
    index: int = field(default=0, compare=False)  # position of the stretch in the schedule

    @property
    def end_step(self) -> int:
        return self.start_step + self.num_steps

    @property
    def is_update(self) -> bool:
        return self.kind == "update"


def _check_counts(warmup_step: int, update_step: int, update_times: int) -> None:
    for name, value, low in (("warmup_step", warmup_step, 0), ("update_step", update_step, 0),
                             ("update_times", update_times, -1)):
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    if update_times != 0 and update_step == 0:
        raise ValueError(f"update_step must be >= 1 when update_times != 0, got update_step=0, update_times={update_times}")


def total_steps(
    warmup_step: int,
    update_step: int,
    update_times: int,
    global_batch: int,
    *,
    num_train_epochs: float = 1.0,
    max_steps: int = -1,
    train_step: int | None = None,
    rows: int | None = None,
    cycles: bool = True,
) -> int:
    """Optimizer steps of a select (``cycles``) or mix run.

    ``max_steps > 0`` wins, then ``train_step``; otherwise ``ceil(num_train_epochs x cycle)`` when
    the cycle is finite (``update_times >= 0``), else ``ceil(num_train_epochs x ceil(rows / G))``:
    as many steps as plain training would take over ``rows`` rows.
    """
    _check_counts(warmup_step, update_step, update_times)
    if max_steps is not None and max_steps > 0:
        return int(max_steps)
    if train_step is not None and train_step > 0:
        return int(train_step)
    if num_train_epochs <= 0:
        raise ValueError(f"num_train_epochs must be > 0, got {num_train_epochs}")
    if update_times >= 0:
        cycle = warmup_step + update_step * update_times
        if cycle == 0:
            raise ValueError("warmup_step + update_step * update_times must be >= 1 (the schedule has no steps)")
        # the small tolerance keeps e.g. 1.1 * 10 = 11.000000000000002 at 11 steps
        return max(1, math.ceil(num_train_epochs * cycle - 1e-9))
    if not rows:
        raise ValueError("update_times: -1 needs train_step, max_steps or a training set to count epochs over")
    return max(1, math.ceil(num_train_epochs * math.ceil(rows / global_batch) - 1e-9))


@dataclass(frozen=True)
class Schedule:
    warmup_step: int
    update_step: int
    update_times: int
    global_batch: int
    total_steps: int
    stretches: tuple[Stretch, ...]
    cycles: bool = True

    @classmethod
    def build(
        cls,
        warmup_step: int,
        update_step: int,
        update_times: int,
        global_batch: int,
        total: int,
        cycles: bool = True,
    ) -> "Schedule":
        _check_counts(warmup_step, update_step, update_times)
        if global_batch < 1:
            raise ValueError(f"global batch must be >= 1, got {global_batch}")
        if total < 1:
            raise ValueError(f"the run must have at least one step, got {total}")
        stretches: list[Stretch] = []

        def add(kind: str, steps: int, cycle: int, number: int | None = None, t: int | None = None) -> int:
            start = stretches[-1].end_step if stretches else 0
            n = min(steps, total - start)
            stretches.append(Stretch(kind, start, n, cycle, number, t, len(stretches)))
            return start + n

        step, cycle, number = 0, 0, 0
        while step < total:
            if warmup_step > 0 and (cycles or cycle == 0):
                step = add("warmup", warmup_step, cycle)
            t = 0
            while step < total and (update_times < 0 or t < update_times):
                step = add("update", update_step, cycle, number, t)
                number, t = number + 1, t + 1
            if not cycles:
                while step < total:
                    step = add("hold", update_step or HOLD_STEPS, cycle)
            elif update_times == 0 and warmup_step == 0:
                raise ValueError("the schedule has no steps")
            cycle += 1
        return cls(warmup_step, update_step, update_times, global_batch, total, tuple(stretches), cycles)

    @property
    def updates(self) -> list[Stretch]:
        return [s for s in self.stretches if s.is_update]

    @property
    def num_updates(self) -> int:
        return len(self.updates)

    def stretch_at(self, step: int) -> Stretch:
        """The stretch that optimizer step ``step`` (0-based) belongs to."""
        if not 0 <= step < self.total_steps:
            raise IndexError(f"step {step} is outside the schedule [0, {self.total_steps})")
        starts = [s.start_step for s in self.stretches]
        return self.stretches[bisect.bisect_right(starts, step) - 1]

    def samples_for(self, stretch: Stretch) -> int:
        """How many training-set rows the draw for ``stretch`` must return."""
        return self.global_batch * stretch.num_steps

    def describe(self, what: str = "selection") -> str:
        ups = self.updates
        at = ", ".join(str(s.start_step) for s in ups[:8]) + (", ..." if len(ups) > 8 else "")
        times = "until the end" if self.update_times < 0 else f"{self.update_times} x"
        if self.cycles:
            shape = f"cycle = {self.warmup_step} warm-up + {times} {self.update_step} {what} steps"
        else:
            shape = f"{self.warmup_step} warm-up steps, then {times} {what}s every {self.update_step} steps"
        return f"{self.total_steps} optimizer steps x {self.global_batch} rows; {shape}; {len(ups)} {what}(s) at step(s) [{at}]"


def rank_micro_batch(step_indices: Sequence[int], micro: int, rank: int, per_device: int, world_size: int) -> list[int]:
    """The indices rank ``rank`` trains on in micro-batch ``micro`` of one optimizer step.

    ``step_indices`` holds the ``G`` indices of the step. Micro-batch ``m`` covers the slice
    ``[m * per_device * world_size, (m + 1) * per_device * world_size)``, of which rank ``r``
    takes the ``r``-th block of ``per_device`` indices - the same split a distributed sampler makes.
    """
    chunk = per_device * world_size
    start = micro * chunk + rank * per_device
    return list(step_indices[start : start + per_device])
