"""``dynamic_select``: a selector picks the training rows of each stretch of the schedule.

The round draws seeded random rows during the warm-up, asks the selector at every selection (every
rank scores its share, rank 0 decides, all receive) and hands the trainer the rows of each step.
The training loader is one of slots; each step's rows are collated when the step starts.
"""

from __future__ import annotations

import time
from typing import Any, Callable

import torch

from ..core.records import RunLog
from ..core.rounds import LogFn, StretchRound, summary_scalars
from ..dist.agreement import AgreedFailure, Agreement
from ..errors import ConfigError, SelectionError
from ..schedule import Schedule, Stretch
from ..seeding import seeded_generator
from ..selectors.base import SelectionContext, SelectionResult, uniform_draw
from .base import ModeChecks, ModeContext
from .rows import ScheduledRows
from .run import describe_schedule, stretch_schedule_digest, stretch_schedule_manifest


class SelectRound(StretchRound):
    """``dynamic_select``: a seeded random draw per warm-up, a selector's choice per selection."""

    what = "selection"

    def __init__(self, schedule: Schedule, selector: Any, context: Callable[[Stretch, int], Any], train_size: int,
                 agreement: Agreement, log: RunLog | None, seed: int, component: str, log_fn: LogFn | None = None):
        super().__init__(schedule, agreement, log, seed, log_fn)
        self.selector = selector
        self.context = context
        self.train_size = train_size
        self.component = component
        self.pool: list[int] | None = None  # a pipeline's pool: the selector picks positions in it (None: every row)

    def _enter(self, stretch: Stretch) -> list[int]:
        n = self.schedule.samples_for(stretch)
        if not stretch.is_update:
            rows, _ = uniform_draw(self.train_size, n, seeded_generator(self.seed, "warmup", stretch.cycle))
            self.info("warm-up cycle %d: %d random samples for steps %d-%d", stretch.cycle, n, stretch.start_step,
                      stretch.end_step - 1)
            return rows
        return self._select(stretch, n)

    def _select(self, stretch: Stretch, n: int) -> list[int]:
        step, k = stretch.start_step, stretch.number
        label = f"selection {k + 1} at step {step} (selector '{self.selector.name}')"
        start = time.perf_counter()

        share = float(getattr(getattr(self.selector, "params", None), "random_share", 0.0) or 0.0)
        n_random = min(n - 1, round(share * n)) if share > 0 else 0
        n_chosen = n - n_random

        def select():
            result = self.selector.select(self.context(stretch, n_chosen))
            result.check(n_chosen, self.train_size)
            return result

        try:
            mine = self.agreement.run(f"selection {k + 1}", select)
            result = self.agreement.share(f"selection {k + 1}: the decision", lambda: mine)
        except AgreedFailure as err:
            raise SelectionError(f"{label} {err}") from None
        if n_random:
            result = self._add_random_share(result, n_random, k)
        result = result.reordered(self._order(n, stretch))
        if self.pool is not None:  # positions in the pool -> training rows
            result = SelectionResult([self.pool[i] for i in result.indices], result.per_sample, result.summary)
        seconds = time.perf_counter() - start
        self.seconds += seconds
        unique = len(set(result.indices))
        record = {
            "kind": "selection", "indices": result.indices, "per_sample": result.per_sample, "summary": result.summary,
            "selector": self.selector.name, "component": self.component, "selection": k, "cycle_selection": stretch.t,
            "step": step, "num_steps": stretch.num_steps, "seconds": round(seconds, 4),
        }
        self.log.write_record(step, record)
        self.history.append({"step": step, "seconds": seconds, "unique": unique})
        self.info("selection %d/%d at step %d by '%s': %d samples (%d unique) in %.2fs -> %s", k + 1,
                  self.schedule.num_updates, step, self.selector.name, n, unique, seconds,
                  self.log.record_path(step).name)
        logs = {"dataflex/selection_seconds": round(seconds, 4), "dataflex/unique_samples": unique}
        for key, values in result.per_sample.items():
            logs.update(summary_scalars(f"dataflex/{key}", values))
        self.log_fn(logs)
        return result.indices

    def _add_random_share(self, result: Any, n_random: int, number: int) -> Any:
        """The selector's picks plus ``n_random`` rows drawn uniformly from the rows it did not pick.

        The draw is seeded by the run's seed and the selection number, so every rank makes the same
        one after the decision was shared. Per-sample values of the random rows are ``None``; the
        per-sample flag ``random_share`` tells the two kinds apart in the record.
        """
        picked = set(result.indices)
        rest = [i for i in range(self.train_size) if i not in picked]
        gen = seeded_generator(self.seed, "random-share", number)
        if len(rest) >= n_random:
            extra = [rest[i] for i in torch.randperm(len(rest), generator=gen)[:n_random].tolist()]
        else:  # the selector took (nearly) everything: draw from the whole set
            extra = torch.randint(self.train_size, (n_random,), generator=gen).tolist()
        per_sample = {key: list(values) + [None] * n_random for key, values in result.per_sample.items()}
        per_sample["random_share"] = [False] * len(result.indices) + [True] * n_random
        summary = {**result.summary, "random_share": {"chosen": len(result.indices), "random": n_random}}
        return SelectionResult(list(result.indices) + extra, per_sample, summary)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "component": self.selector.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        if state.get("component"):
            self.selector.load_state_dict(state["component"])


# ---------------------------------------------------------------------------------------------- mixing


class SelectMode(ModeChecks):
    name = "select"

    @classmethod
    def check_args(cls, args: Any) -> None:
        for key in ("update_step", "update_times"):
            if getattr(args, key) is None:
                raise ConfigError(f"{key}: required with train_type: dynamic_select (an integer)")
        if args.update_times >= 0 and args.warmup_step + args.update_step * args.update_times == 0:
            raise ConfigError("warmup_step/update_step/update_times: the schedule has no steps; "
                              "set warmup_step >= 1 or update_step, update_times >= 1")

    def __init__(self, ctx: ModeContext):
        self.ctx = ctx
        fa, targs = ctx.fa, ctx.args
        total = ctx.steps(True, fa.update_step, fa.update_times)
        self.schedule = Schedule.build(fa.warmup_step, fa.update_step, fa.update_times, ctx.global_batch, total)
        targs.max_steps = total  # the LR schedule spans exactly the schedule
        self.round = SelectRound(self.schedule, ctx.component, self.context, len(ctx.train), ctx.agreement,
                                 None, targs.seed, ctx.spec.key,
                                 log_fn=ctx.trainer.log)
        self.rows = ScheduledRows(ctx, self.round.rows, lambda: self.schedule.total_steps)

    # ------------------------------------------------------------------ the step's data
    def train_loader(self, default: Callable[[], Any]) -> Any:
        return self.rows.train_loader(default)

    def num_examples(self, dataloader: Any, default: Callable[[Any], int]) -> int:
        return self.rows.num_examples(dataloader, default)

    def step_batches(self, epoch_iterator: Any, num_batches: int, device: Any, default: Callable) -> Any:
        return self.rows.step_batches(epoch_iterator, num_batches, device, default)

    def loss_hook(self) -> None:
        return None

    def loss_inputs(self, inputs: dict[str, Any]) -> dict[str, Any]:
        return inputs

    # ------------------------------------------------------------------ the selector's context
    def learning_rate(self) -> float:
        """η of the coming step: the rate of the parameter group holding the LoRA A matrices (or the first group)."""
        t = self.ctx.trainer
        lr = t.args.learning_rate
        optimizer = getattr(t, "optimizer", None)
        groups = getattr(optimizer, "param_groups", None) if optimizer is not None else None
        if groups:
            lora_a = {id(p) for n, p in t.model.named_parameters() if "lora_A" in n}
            group = next((g for g in groups if any(id(p) in lora_a for p in g["params"])), groups[0])
            lr = float(group.get("lr", lr))
        return lr

    def context(self, stretch: Stretch, n: int) -> SelectionContext:
        ctx = self.ctx
        t = ctx.trainer
        log = self.round.log
        return SelectionContext(
            step=stretch.start_step,
            selection=stretch.number,
            num_selections=self.schedule.num_updates,
            num_samples=n,
            train_dataset=ctx.train,
            scorer=ctx.engine(),
            generator=seeded_generator(t.args.seed, "select", stretch.number),
            records_dir=str(log.folder) if log is not None else ctx.cache_dir,
            eval_dataset=ctx.eval,
            optimizer=t.optimizer,
            learning_rate=self.learning_rate(),
            tokenizer=getattr(t, "processing_class", None),
            cache_dir=ctx.cache_dir,
            eval_groups=ctx.eval_groups,
        )

    # ------------------------------------------------------------------ records and state
    def schedule_digest(self) -> list[Any]:
        return stretch_schedule_digest(self.schedule)

    def schedule_manifest(self) -> dict[str, Any]:
        return stretch_schedule_manifest(self.schedule)

    def round_state(self) -> dict[str, Any]:
        return self.round.state_dict()

    def load_round_state(self, state: dict[str, Any]) -> None:
        self.round.load_state_dict(state)

    def start(self, log: RunLog) -> None:
        pass

    def describe(self) -> None:
        describe_schedule(self, self.schedule)

    def metrics(self) -> dict[str, Any]:
        return {"dataflex_selections": len(self.round.history)}

    def finish_files(self) -> list[str]:
        return []
