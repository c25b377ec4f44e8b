"""``dynamic_reorder``: a reorderer decides the order in which the training rows are consumed.

Rows are consumed as a stream of epochs: each epoch is a permutation of the training set, and
step ``s`` takes the next ``G`` rows of the stream (a step at an epoch's end takes the first rows
of the next one). Without pacing every row is therefore seen exactly once per epoch; the run has
``ceil(rows x num_train_epochs / G)`` steps unless ``max_steps`` / ``train_step`` say otherwise.

* Before the first ordering (``warmup_step`` steps) the stream is in a seeded random order.
* A static reorderer orders the rows left in the epoch once, at ``warmup_step``, and every later
  epoch by the same scores; with pacing, each step instead draws ``G`` rows (seeded) from the
  easiest share c(t) of all rows in score order.
* A dynamic reorderer re-orders the rows left in the epoch every ``update_step`` steps from
  ``warmup_step`` on (``update_times`` orderings, unset or -1: until the run ends); a new epoch
  starts in a seeded random order until its next ordering. Consumed rows stay consumed.

Every ordering is computed on all ranks (model scoring is sharded) and rank 0's is shared; the
stream's position, the current epoch's order and the scores are saved in the checkpoint.
Records: ``order.jsonl`` (one line per step: its rows and their scores) and ``step_N.json`` per
ordering.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any, Callable

import torch

from ..core.records import RunLog
from ..core.rounds import LogFn, Round, summary_scalars
from ..dist.agreement import AgreedFailure, Agreement
from ..errors import ConfigError, SelectionError
from ..reorderers.base import ReorderContext
from ..seeding import seeded_generator
from .base import ModeChecks, ModeContext
from .rows import ScheduledRows

logger = logging.getLogger("dataflex")
LINES = "order.jsonl"


def reorder_steps(rows: int, global_batch: int, num_train_epochs: float, max_steps: int | None,
                  train_step: int | None) -> int:
    """Optimizer steps of a reorder run: ``max_steps`` > 0, else ``train_step``, else ceil(rows x epochs / G)."""
    if max_steps is not None and max_steps > 0:
        return int(max_steps)
    if train_step:
        return int(train_step)
    if num_train_epochs <= 0:
        raise ConfigError(f"num_train_epochs: {num_train_epochs} is invalid; allowed: a number > 0")
    if rows < 1:
        raise ConfigError("dataset: the training set has no rows")
    return max(1, math.ceil(rows * num_train_epochs / global_batch - 1e-9))


def ordering_steps(dynamic: bool, warmup_step: int, update_step: int | None, update_times: int | None,
                   total: int) -> list[int]:
    """The steps at whose start an ordering is made."""
    if warmup_step >= total:
        return []
    if not dynamic:
        return [warmup_step]
    out, step = [], warmup_step
    while step < total and (update_times is None or update_times < 0 or len(out) < update_times):
        out.append(step)
        step += int(update_step)
    return out


def agreed_order(agreement: Agreement, reorderer: Any, ctx: ReorderContext, rows: list[int], where: str,
                 what: str) -> Any:
    """The reorderer's ordering of ``rows`` on ``ctx``: every rank orders (a failure on any rank ends all of
    them), rank 0's result is the one every rank keeps, and it must be a permutation of ``rows``. ``where``
    names the step between the ranks, ``what`` the ordering in a failure's one line."""
    def decide():
        result = reorderer.order(ctx)
        result.check(rows)
        return result

    try:
        mine = agreement.run(where, decide)
        return agreement.share(f"{where}: the decision", lambda: mine)
    except AgreedFailure as err:
        raise SelectionError(f"{what} {err}") from None


def read_column(ctx: ModeContext, component: str, name: str | None) -> list[float] | None:
    """The numeric dataset column ``name`` a reorderer reads, one finite value per training row."""
    if not name:
        return None
    key = f"component '{component}': param 'column' = '{name}'"
    values = (getattr(ctx.data, "columns", None) or {}).get(name)
    if values is None:
        raise ConfigError(f"{key}: the column was not read with the training data")
    if len(values) != len(ctx.train):
        raise ConfigError(f"{key}: {len(values)} values for {len(ctx.train)} training rows (rows were dropped or "
                          "packed during preprocessing, so they cannot be matched to dataset rows)")
    out = []
    for i, v in enumerate(values):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise ConfigError(f"{key}: training row {i} holds {v!r}; allowed: finite numbers in every row")
        out.append(float(v))
    return out


class ReorderRound(Round):
    """The stream of epochs, the orderings, and the rows of every step."""

    what = "ordering"

    def __init__(self, reorderer: Any, train_size: int, global_batch: int, total: int, warmup_step: int,
                 orderings_at: list[int], context: Callable[[int, int, list[int]], ReorderContext],
                 agreement: Agreement, log: RunLog | None, seed: int, component: str, log_fn: LogFn | None = None):
        super().__init__(agreement, log, seed, log_fn)
        self.reorderer = reorderer
        self.n = train_size
        self.g = global_batch
        self.total = total
        self.warmup_step = warmup_step
        self.orderings_at = orderings_at
        self.context = context
        self.component = component
        self.epoch = 0
        self.order = self._shuffled(0)  # the current epoch's permutation
        self.consumed = 0  # rows of self.order consumed so far
        self.ranked: list[int] | None = None  # pacing: every row in score order
        self.scores: list[float | None] = [None] * train_size  # the score each row was last ordered by
        self.orderings = 0
        self.next_step = 0
        self.last: tuple[int, list[int]] | None = None

    # ------------------------------------------------------------------ the stream
    def _shuffled(self, epoch: int) -> list[int]:
        return torch.randperm(self.n, generator=seeded_generator(self.seed, "reorder-epoch", epoch)).tolist()

    def rows(self, step: int) -> list[int]:
        """The ``G`` rows of optimizer step ``step`` (asked for once per step, in step order)."""
        if self.last is not None and self.last[0] == step:
            return self.last[1]
        if step != self.next_step:
            raise RuntimeError(f"DataFlex: the rows of step {step} were asked for, but step {self.next_step} is next")
        if step in self.orderings_at:
            self._order(step)
        competence = available = None
        if self.ranked is not None:
            competence = self.reorderer.competence(step - self.warmup_step, self.total - self.warmup_step)
            available = max(1, min(self.n, math.ceil(competence * self.n - 1e-9)))
            gen = seeded_generator(self.seed, "pace", step)
            if available >= self.g:
                picks = torch.randperm(available, generator=gen)[: self.g].tolist()
            else:
                picks = torch.randint(available, (self.g,), generator=gen).tolist()
            rows = [self.ranked[p] for p in picks]
            epoch, position = None, None
        else:
            epoch, position = self.epoch, self.consumed
            rows = self._take(self.g)
        line: dict[str, Any] = {"step": step, "epoch": epoch, "position": position, "indices": rows,
                                "scores": [self.scores[i] for i in rows]}
        if competence is not None:
            line["competence"] = round(competence, 6)
            line["available"] = available
        self.log.append(LINES, line)
        self.next_step, self.last = step + 1, (step, rows)
        return rows

    def _take(self, k: int) -> list[int]:
        out: list[int] = []
        while len(out) < k:
            if self.consumed == len(self.order):
                self._new_epoch()
            m = min(k - len(out), len(self.order) - self.consumed)
            out += self.order[self.consumed: self.consumed + m]
            self.consumed += m
        return out

    def _new_epoch(self) -> None:
        self.epoch += 1
        self.consumed = 0
        self.order = self._shuffled(self.epoch)
        if not self.reorderer.dynamic and self.orderings:  # static: the new epoch in the stored score order
            result = self._decide(self.next_step, self.order, f"epoch {self.epoch} order")
            self.order = list(result.rows)

    # ------------------------------------------------------------------ orderings
    def _decide(self, step: int, rows: list[int], label: str) -> Any:
        result = agreed_order(self.agreement, self.reorderer, self.context(step, self.orderings, rows), rows, label,
                              f"{label} at step {step} (reorderer '{self.reorderer.name}')")
        for i, s in zip(result.rows, result.scores):
            self.scores[i] = s
        return result

    def _order(self, step: int) -> None:
        start = time.perf_counter()
        k = self.orderings
        pacing = self.reorderer.competence(0, max(1, self.total - self.warmup_step)) is not None
        if pacing:
            rows = list(range(self.n))
        else:
            if self.consumed == len(self.order):
                self._new_epoch()
            rows = self.order[self.consumed:]
        label = f"ordering {k + 1}"
        result = self._decide(step, rows, label)
        if pacing:
            self.ranked = list(result.rows)
        else:
            self.order = self.order[: self.consumed] + list(result.rows)
        self.orderings += 1
        seconds = time.perf_counter() - start
        self.seconds += seconds
        scored = [s for s in result.scores if s is not None]
        record = {"kind": "ordering", "ordering": k, "step": step, "epoch": None if pacing else self.epoch,
                  "consumed_before": None if pacing else self.consumed, "rows": list(result.rows),
                  "scores": list(result.scores), "summary": result.summary, "reorderer": self.reorderer.name,
                  "component": self.component, "seconds": round(seconds, 4)}
        self.log.write_record(step, record)
        self.history.append({"step": step, "seconds": seconds, "rows": len(rows)})
        how = "all rows, paced" if pacing else f"{len(rows)} rows left in epoch {self.epoch}"
        self.info("ordering %d at step %d by '%s': %s, %d scored, in %.2fs -> %s", k + 1, step,
                  self.reorderer.name, how, len(scored), seconds, self.log.record_path(step).name)
        logs = {"dataflex/ordering_seconds": round(seconds, 4)}
        logs.update(summary_scalars("dataflex/order_score", scored))
        self.log_fn(logs)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "order": list(self.order), "consumed": self.consumed, "ranked": self.ranked,
                "scores": list(self.scores), "orderings": self.orderings, "next_step": self.next_step,
                "component": self.reorderer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch = int(state["epoch"])
        self.order = [int(i) for i in state["order"]]
        self.consumed = int(state["consumed"])
        self.ranked = [int(i) for i in state["ranked"]] if state.get("ranked") is not None else None
        self.scores = list(state["scores"])
        self.orderings = int(state["orderings"])
        self.next_step = int(state["next_step"])
        self.last = None
        if state.get("component"):
            self.reorderer.load_state_dict(state["component"])


class ReorderMode(ModeChecks):
    name = "reorder"

    @classmethod
    def check_steps(cls, cfg: dict[str, Any], component: Any) -> None:
        if component.dynamic:
            if not cfg.get("update_step"):
                raise ConfigError(f"update_step: required with reorderer '{component.name}' (steps between two "
                                  "orderings); allowed: an integer >= 1")
            return
        ignored = [k for k in ("update_step", "update_times") if cfg.get(k) is not None]
        if ignored:
            logger.warning("[DataFlex] %s: ignored with reorderer '%s' (it orders the rows once, at warmup_step)",
                           ", ".join(ignored), component.name)

    @classmethod
    def data_columns(cls, component: Any) -> list[str]:
        return [component.column] if component.column else []

    def __init__(self, ctx: ModeContext):
        self.ctx = ctx
        self.component = ctx.component
        fa, targs = ctx.fa, ctx.args
        self.total = reorder_steps(len(ctx.train), ctx.global_batch, targs.num_train_epochs, targs.max_steps,
                                   fa.train_step)
        targs.max_steps = self.total  # the LR schedule spans exactly the run
        self.orderings_at = ordering_steps(self.component.dynamic, fa.warmup_step, fa.update_step, fa.update_times,
                                           self.total)
        self.column = self._column()
        self.round = ReorderRound(self.component, len(ctx.train), ctx.global_batch, self.total, fa.warmup_step,
                                  self.orderings_at, self.context, ctx.agreement, None, targs.seed, ctx.spec.key,
                                  log_fn=ctx.trainer.log)
        self.rows = ScheduledRows(ctx, self.round.rows, lambda: self.total)

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

    def _column(self) -> list[float] | None:
        return read_column(self.ctx, self.ctx.spec.key, self.component.column)

    def context(self, step: int, number: int, rows: list[int]) -> ReorderContext:
        ctx = self.ctx
        return ReorderContext(step=step, number=number, rows=list(rows), train_dataset=ctx.train,
                              scorer=ctx.engine(), generator=seeded_generator(ctx.args.seed, "reorder", number),
                              column=self.column)

    def describe(self) -> None:
        ctx = self.ctx
        at = ", ".join(str(s) for s in self.orderings_at[:8]) + (", ..." if len(self.orderings_at) > 8 else "")
        pace = self.component.competence(0, max(1, self.total - ctx.fa.warmup_step))
        logger.info("[DataFlex] order: %d optimizer steps x %d rows (%d training rows, %s); %d warm-up step(s) in "
                    "random order; %d ordering(s) at step(s) [%s]%s", self.total, ctx.global_batch, len(ctx.train),
                    f"{self.total * ctx.global_batch / len(ctx.train):.2f} epochs", ctx.fa.warmup_step,
                    len(self.orderings_at), at, f"; paced from a share of {pace:.3f}" if pace is not None else "")
        if not self.orderings_at:
            logger.warning("[DataFlex] warmup_step %d >= the run's %d steps: the rows are never ordered",
                           ctx.fa.warmup_step, self.total)

    # ------------------------------------------------------------------ records and state
    def schedule_digest(self) -> list[Any]:
        fa = self.ctx.fa
        return [fa.warmup_step, fa.update_step, fa.update_times, self.total]

    def schedule_manifest(self) -> dict[str, Any]:
        fa = self.ctx.fa
        return {"warmup_step": fa.warmup_step, "update_step": fa.update_step, "update_times": fa.update_times,
                "global_batch": self.ctx.global_batch, "total_steps": self.total, "updates": list(self.orderings_at)}

    def round_state(self) -> dict[str, Any]:
        return self.round.state_dict()

    def load_round_state(self, state: dict[str, Any]) -> None:
        self.round.load_state_dict(state)

    def start(self, log: RunLog) -> None:
        if self.ctx.resumed_at is not None:  # the steps the checkpoint has not seen are written again
            at = self.ctx.resumed_at
            log.truncate(LINES, lambda line: line.get("step", 0) < at)

    def metrics(self) -> dict[str, Any]:
        return {"dataflex_orderings": self.round.orderings}

    def finish_files(self) -> list[str]:
        return []
