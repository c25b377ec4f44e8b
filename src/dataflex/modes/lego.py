"""``dynamic_lego``: a pipeline of existing components, composed from the other modes' pieces.

The run follows a schedule of stretches as ``dynamic_select`` does (``warmup_step``,
``update_step``, ``update_times``): warm-up stretches train on a seeded uniform draw, and at the
start of every other stretch (an *update*) the index-space stages make the stretch's rows:

    every row -> selector (filter: a share of the pool; draw: the update's rows)
              -> mixer (the update's rows by domain proportions) | uniform draw (when nothing takes them)
              -> reorder (the update's rows in the order they are trained on)

A stage decides again when it is *due* (past its ``warmup_step``, and ``every`` steps after its
last decision); once one stage decides, every stage after it decides too (its input changed), and
the stages before it hand on what they last handed on. A stage still in its warm-up passes its
input through. The rows are scheduled by :class:`~dataflex.modes.rows.ScheduledRows`. Weighter
stages run as ``dynamic_weight`` runs them (one :class:`~dataflex.modes.weight.WeightMode` per
stage); a mixer whose decision acts on the loss (doremi) is a loss-space stage too
(:class:`ReweightStage`: its domain weights, as ``dynamic_mix`` applies them); their weights
multiply.

Records: ``step_N.json`` per update in the run's folder (every stage's rows in and out), and each
stage's own records in ``stage-<i>-<family>/`` beside them, in its own mode's format.
"""

from __future__ import annotations

import bisect
import copy
import logging
import time
from typing import Any, Callable

import torch

from ..core.records import RunLog, fingerprint
from ..core.rounds import LogFn, StretchRound
from ..core.sampling import largest_remainder
from ..dist.agreement import AgreedFailure
from ..errors import ConfigError, SelectionError
from ..mixers.base import DomainStats, MixContext, starting_proportions
from ..pipelines import UNIFORM, Stage
from ..reorderers.base import ReorderContext
from ..schedule import Schedule, Stretch
from ..seeding import seeded_generator
from ..selectors.base import SelectionContext, uniform_draw
from .base import DOMAIN_KEY, INDEX_KEY, WEIGHT_KEY, ModeChecks, ModeContext
from .loss import LossSignals
from .mix import MixMode, decide_mixture, loss_weight_logs, step_domain_weights
from .reorder import agreed_order, read_column
from .rows import ScheduledRows
from .run import describe_schedule, stretch_schedule_digest, stretch_schedule_manifest
from .select import SelectMode, SelectRound
from .weight import WeightMode

logger = logging.getLogger("dataflex")


def stage_folder(i: int, stage: Stage) -> str:
    """The sub-folder of a run's records that holds stage ``i``'s own records."""
    return f"stage-{i}-{stage.family}"


def fit_budget(rows: list[int], n: int, ordered: bool, generator: torch.Generator) -> tuple[list[int], str | None]:
    """``rows`` made exactly ``n`` long (what a stage in its warm-up may leave): the head of an ordered
    list, a seeded draw from an unordered one, the list repeated when it is short."""
    if len(rows) == n:
        return rows, None
    if not rows:
        raise SelectionError("the pipeline's stages left no rows for the update")
    if len(rows) > n:
        if ordered:
            return rows[:n], "head"
        return [rows[i] for i in torch.randperm(len(rows), generator=generator)[:n].tolist()], "drawn"
    return [rows[i % len(rows)] for i in range(n)], "repeated"


# ---------------------------------------------------------------------------------------------- stages
class IndexStage:
    """A stage of the index space: ``apply(pool, stretch, n)`` -> its output rows."""

    def __init__(self, stage: Stage, index: int):
        self.stage = stage
        self.index = index
        self.last_run: int | None = None  # the step of its last decision
        self.out: list[int] | None = None  # what it last handed on
        self.log: RunLog | None = None
        self.seconds = 0.0
        self.decisions = 0

    def due(self, step: int) -> bool:
        s = self.stage
        return s.is_active(step) and (self.last_run is None or step - self.last_run >= s.every)

    def apply(self, pool: list[int], stretch: Stretch, n: int) -> list[int]:  # pragma: no cover - interface
        raise NotImplementedError

    def component_state(self) -> dict[str, Any]:
        return {}

    def load_component_state(self, state: dict[str, Any]) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return {"last_run": self.last_run, "out": self.out, "decisions": self.decisions,
                "component": self.component_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.last_run = state["last_run"]
        self.out = [int(i) for i in state["out"]] if state.get("out") is not None else None
        self.decisions = int(state.get("decisions", 0))
        self.load_component_state(state.get("component") or {})


class SelectStage(IndexStage):
    """A selector, as ``dynamic_select`` runs it (:class:`SelectRound`), on the pool it is given."""

    def __init__(self, stage: Stage, index: int, mode: "LegoMode"):
        super().__init__(stage, index)
        self.mode = mode
        ctx = mode.ctx
        self.round = SelectRound(mode.schedule, stage.built, self.context, len(ctx.train), ctx.agreement, None,
                                 ctx.args.seed, stage.component, log_fn=ctx.trainer.log)

    def context(self, stretch: Stretch, n: int) -> SelectionContext:
        mode, ctx = self.mode, self.mode.ctx
        t = ctx.trainer
        train = ctx.train
        pool = self.round.pool
        if pool is not None:
            train = train.select(pool) if hasattr(train, "select") else [train[i] for i in pool]
        return SelectionContext(
            step=stretch.start_step, selection=stretch.number, num_selections=mode.schedule.num_updates,
            num_samples=n, train_dataset=train, scorer=ctx.engine(),
            generator=seeded_generator(t.args.seed, "select", stretch.number),
            records_dir=str(self.log.folder) if self.log is not None else ctx.cache_dir,
            eval_dataset=ctx.eval, optimizer=t.optimizer, learning_rate=SelectMode.learning_rate(mode),
            tokenizer=getattr(t, "processing_class", None), cache_dir=ctx.cache_dir, eval_groups=ctx.eval_groups)

    def apply(self, pool: list[int], stretch: Stretch, n: int) -> list[int]:
        whole = len(pool) == len(self.mode.ctx.train) and pool == list(range(len(pool)))
        self.round.pool = None if whole else list(pool)
        self.round.train_size = len(pool)
        self.round.log = self.log
        want = n if self.stage.mode == "draw" else max(1, int(len(pool) * self.stage.keep_ratio))
        before = self.round.seconds
        rows = self.round._select(stretch, want)
        self.seconds += self.round.seconds - before
        if self.stage.mode == "filter":  # a pool is a set of rows: repeats say nothing more
            rows = list(dict.fromkeys(rows))
        return rows

    def component_state(self) -> dict[str, Any]:
        return self.stage.built.state_dict()

    def load_component_state(self, state: dict[str, Any]) -> None:
        if state:
            self.stage.built.load_state_dict(state)


class UniformStage(IndexStage):
    """The update's rows drawn uniformly from the pool (placed when no stage takes the budget)."""

    def __init__(self, stage: Stage, index: int, seed: int):
        super().__init__(stage, index)
        self.seed = seed

    def apply(self, pool: list[int], stretch: Stretch, n: int) -> list[int]:
        picks, _ = uniform_draw(len(pool), n, seeded_generator(self.seed, "lego-uniform", stretch.index))
        return [pool[i] for i in picks]


class Domains:
    """The training datasets as a mixer stage's domains: names, first rows, sizes, starting proportions."""

    def __init__(self, stage: Stage, ctx: ModeContext):
        info = ctx.data
        if info is None or not info.parts or not info.exact:
            raise ConfigError(f"dataset: pipeline stage mixer '{stage.component}' could not tell which rows come "
                              "from which dataset")
        self.domains = [p[0] for p in info.parts]
        self.starts = [p[1] for p in info.parts]
        self.sizes = [p[2] - p[1] for p in info.parts]
        fa = ctx.fa
        self.initial, how = starting_proportions(fa.mixture_sample_rule or "mixture", self.sizes,
                                                 fa.init_mixture_proportions, self.domains, stage.built)
        if ctx.rank == 0:
            logger.info("[DataFlex] pipeline mixer '%s': domains %s with %s rows; starting proportions %s: %s",
                        stage.component, self.domains, self.sizes, [round(x, 4) for x in self.initial], how)

    def domain_of(self, row: int) -> int:
        return bisect.bisect_right(self.starts, row) - 1


class MixStage(IndexStage):
    """A mixer: its proportions over the domains, turned into the update's rows drawn from the pool."""

    def __init__(self, stage: Stage, index: int, mode: "LegoMode", total: int):
        super().__init__(stage, index)
        self.mode = mode
        ctx = mode.ctx
        self.mixer = stage.built
        parts = Domains(stage, ctx)
        self.domains, self.starts, self.sizes = parts.domains, parts.starts, parts.sizes
        self.domain_of = parts.domain_of
        self.mixer.setup(self.domains, self.sizes, parts.initial, total, stage.warmup_step)
        self.total = total
        self.proportions = list(parts.initial)
        self.stats = DomainStats.zeros(len(self.domains))
        self.stats_since = 0
        self.seed = ctx.args.seed

    def observe(self, domains: torch.Tensor, sums: torch.Tensor, tokens: torch.Tensor) -> None:
        self.stats.add(domains, sums, tokens)

    def apply(self, pool: list[int], stretch: Stretch, n: int) -> list[int]:
        ctx = self.mode.ctx
        k = len(self.domains)
        step = stretch.start_step
        label = f"mixture update {self.decisions + 1} at step {step} (mixer '{self.mixer.name}')"
        start = time.perf_counter()
        try:
            total = ctx.agreement.all_reduce(f"{label}: statistics", self.stats.flat())
            stats = DomainStats.from_flat(total)
            mctx = MixContext(step=step, update=self.decisions, domains=list(self.domains), sizes=list(self.sizes),
                              proportions=list(self.proportions), stats=stats, steps_since=step - self.stats_since,
                              total_steps=self.total, seed=self.seed, rank=ctx.rank)
            decision = decide_mixture(ctx.agreement, label, self.mixer, mctx)
        except AgreedFailure as err:
            raise SelectionError(f"{label} {err}") from None
        self.proportions = list(decision.proportions)
        self.stats = DomainStats.zeros(k)
        self.stats_since = step
        groups: list[list[int]] = [[] for _ in range(k)]
        for row in pool:
            groups[self.domain_of(row)].append(row)
        live = [p if groups[d] else 0.0 for d, p in enumerate(self.proportions)]
        if sum(live) <= 0:  # the pool holds no row of any domain the mixer wants: follow the pool's own make-up
            live = [float(len(g)) for g in groups]
        counts = largest_remainder([p / sum(live) for p in live], n)
        rows: list[int] = []
        for d, (group, c) in enumerate(zip(groups, counts)):
            if c:
                perm = torch.randperm(len(group), generator=seeded_generator(self.seed, "lego-mix", stretch.index,
                                                                            d)).tolist()
                rows += [group[perm[j % len(group)]] for j in range(c)]  # repeated only when the domain is short
        order = torch.randperm(len(rows), generator=seeded_generator(self.seed, "lego-mix-order", stretch.index))
        rows = [rows[i] for i in order.tolist()]
        seconds = time.perf_counter() - start
        self.seconds += seconds
        if self.log is not None:
            self.log.write_record(step, {
                "kind": "update", "step": step, "num_steps": stretch.num_steps, "stretch": stretch.index,
                "mixer": self.mixer.name, "component": self.stage.component, "domains": self.domains,
                "proportions": self.proportions, "counts": counts, "loss_weights": None, "indices": rows,
                "reshuffles": [], "seconds": round(seconds, 4), "update": self.decisions,
                "mixer_proportions": decision.proportions, "summary": decision.summary, "statistics": stats.to_dict(),
                "pool": len(pool)})
        self.mode.round.info("pipeline mixer '%s' at step %d: proportions %s -> %s rows per domain", self.mixer.name,
                             step, [round(p, 4) for p in self.proportions], dict(zip(self.domains, counts)))
        ctx.trainer.log({f"dataflex/proportion_{d}": round(p, 6) for d, p in zip(self.domains, self.proportions)})
        return rows

    def component_state(self) -> dict[str, Any]:
        return {"mixer": self.mixer.state_dict(), "proportions": self.proportions, "stats": self.stats.to_dict(),
                "stats_since": self.stats_since}

    def load_component_state(self, state: dict[str, Any]) -> None:
        if state.get("mixer"):
            self.mixer.load_state_dict(state["mixer"])
        self.proportions = [float(x) for x in state["proportions"]]
        self.stats = DomainStats.from_dict(state["stats"])
        self.stats_since = int(state["stats_since"])


class ReweightStage:
    """A mixer whose decision acts on the loss (doremi), as a loss-space stage.

    It takes no rows. From its ``warmup_step`` on, every step's samples are weighted by the mixer's
    domain weights α as ``dynamic_mix`` weights them (:func:`~dataflex.modes.mix.step_domain_weights`);
    the mixer's statistics (the training forwards' losses and, with a reference model, the excess
    losses) accumulate from step 0 over every micro-batch and rank, and α is updated at the stage's
    ``warmup_step`` and then every ``every`` steps, at the start of the step, before its weights.
    """

    def __init__(self, stage: Stage, index: int, mode: "LegoMode", total: int):
        self.stage, self.index, self.mode = stage, index, mode
        ctx = mode.ctx
        self.mixer = stage.built
        parts = Domains(stage, ctx)
        self.domains, self.sizes, self.domain_of = parts.domains, parts.sizes, parts.domain_of
        self.mixer.setup(self.domains, self.sizes, parts.initial, total, stage.warmup_step)
        self.proportions = list(parts.initial)  # what the mixer is told is in force (it keeps them)
        self.total = total
        self.loss_weights: list[float] | None = self.mixer.initial_loss_weights()
        self.stats = DomainStats.zeros(len(self.domains))
        self.stats_since = 0
        self.last_run: int | None = None
        self.decisions = 0
        self.seconds = 0.0
        self.log: RunLog | None = None
        self.reference = None
        if getattr(self.mixer, "reference_model_path", None):
            from ..scoring.reference import ReferenceModel

            self.reference = ReferenceModel(self.mixer.reference_model_path, ctx.trainer.model, ctx.args.device,
                                            work=ctx.work)

    def due(self, step: int) -> bool:
        s = self.stage
        return s.is_active(step) and (self.last_run is None or step - self.last_run >= s.every)

    def observe(self, signals: LossSignals) -> None:
        """What this rank's training forward saw, per domain (summed over ranks at the next update)."""
        excess = None
        if self.reference is not None:
            excess = self.reference.excess_sums(signals.inputs, signals.labels, signals.logits.detach())
        self.stats.add(signals.domains, signals.sums.detach(), signals.counts, excess)

    def update(self, step: int) -> None:
        ctx = self.mode.ctx
        k = len(self.domains)
        label = f"mixture update {self.decisions + 1} at step {step} (mixer '{self.mixer.name}')"
        start = time.perf_counter()
        try:
            stats = DomainStats.from_flat(ctx.agreement.all_reduce(f"{label}: statistics", self.stats.flat()))
            mctx = MixContext(step=step, update=self.decisions, domains=list(self.domains), sizes=list(self.sizes),
                              proportions=list(self.proportions), stats=stats, steps_since=step - self.stats_since,
                              total_steps=self.total, seed=ctx.args.seed, rank=ctx.rank)
            decision = decide_mixture(ctx.agreement, label, self.mixer, mctx)
        except AgreedFailure as err:
            raise SelectionError(f"{label} {err}") from None
        self.loss_weights = decision.loss_weights
        self.stats = DomainStats.zeros(k)
        self.stats_since = step
        self.last_run = step
        seconds = time.perf_counter() - start
        self.seconds += seconds
        if self.log is not None:
            self.log.write_record(step, {
                "kind": "update", "step": step, "num_steps": None, "stretch": None, "mixer": self.mixer.name,
                "component": self.stage.component, "domains": self.domains, "proportions": self.proportions,
                "counts": None, "loss_weights": self.loss_weights, "indices": [], "reshuffles": [],
                "seconds": round(seconds, 4), "update": self.decisions, "mixer_proportions": decision.proportions,
                "summary": decision.summary, "statistics": stats.to_dict()})
        self.decisions += 1
        self.mode.round.info("pipeline mixer '%s' at step %d: loss weights %s", self.mixer.name, step,
                             [round(w, 4) for w in self.loss_weights] if self.loss_weights else None)
        logs = {f"dataflex/domain_loss_{d}": round(x, 6) for d, x in zip(self.domains, stats.mean_loss())
                if x is not None}
        ctx.trainer.log({**logs, **loss_weight_logs(self.domains, self.loss_weights,
                                                    decision.summary.get("excess_loss"))})

    def weigh_step(self, batches: list[dict[str, Any]]) -> list[torch.Tensor] | None:
        """This step's per-sample weights (one tensor per micro-batch), or None before ``warmup_step``;
        the update comes first when it is due."""
        step = self.mode.ctx.step
        if self.due(step):
            self.update(step)
        if not self.stage.is_active(step) or self.loss_weights is None:
            return None
        return step_domain_weights(self.mode.ctx.agreement, step, self.loss_weights, batches)

    def finish(self, output_dir: str) -> list[str]:
        if self.mode.ctx.rank != 0:
            return []
        self.mixer.finish(self.total)
        return self.mixer.outputs(output_dir)

    def state_dict(self, stats: DomainStats) -> dict[str, Any]:
        return {"mixer": self.mixer.state_dict(), "loss_weights": self.loss_weights, "stats": stats.to_dict(),
                "stats_since": self.stats_since, "last_run": self.last_run, "decisions": self.decisions}

    def load_state_dict(self, state: dict[str, Any], rank: int) -> None:
        if state.get("mixer"):
            self.mixer.load_state_dict(state["mixer"])
        self.loss_weights = state["loss_weights"]
        # the checkpoint holds the statistics summed over ranks: rank 0 resumes with them, the others from 0
        self.stats = DomainStats.from_dict(state["stats"]) if rank == 0 else DomainStats.zeros(len(self.domains))
        self.stats_since = int(state["stats_since"])
        self.last_run = state["last_run"]
        self.decisions = int(state["decisions"])


class ReorderStage(IndexStage):
    """A reorderer: the update's rows in the order they are trained on."""

    def __init__(self, stage: Stage, index: int, mode: "LegoMode"):
        super().__init__(stage, index)
        self.mode = mode
        self.reorderer = stage.built
        self.column = read_column(mode.ctx, stage.component, self.reorderer.column)

    def apply(self, pool: list[int], stretch: Stretch, n: int) -> list[int]:
        ctx = self.mode.ctx
        step, k = stretch.start_step, self.decisions
        label = f"ordering {k + 1} at step {step} (reorderer '{self.reorderer.name}')"
        start = time.perf_counter()
        rctx = ReorderContext(step=step, number=k, rows=list(pool), train_dataset=ctx.train, scorer=ctx.engine(),
                              generator=seeded_generator(ctx.args.seed, "reorder", k), column=self.column)
        result = agreed_order(ctx.agreement, self.reorderer, rctx, pool, label, label)
        seconds = time.perf_counter() - start
        self.seconds += seconds
        if self.log is not None:
            self.log.write_record(step, {
                "kind": "ordering", "ordering": k, "step": step, "epoch": None, "consumed_before": None,
                "rows": list(result.rows), "scores": list(result.scores), "summary": result.summary,
                "reorderer": self.reorderer.name, "component": self.stage.component, "seconds": round(seconds, 4)})
        return list(result.rows)

    def component_state(self) -> dict[str, Any]:
        return self.reorderer.state_dict()

    def load_component_state(self, state: dict[str, Any]) -> None:
        if state:
            self.reorderer.load_state_dict(state)


# ---------------------------------------------------------------------------------------------- the round (the object)
class LegoRound(StretchRound):
    """The stretches of the schedule; at each update, the index-space stages make its rows."""

    what = "pipeline update"

    def __init__(self, schedule: Schedule, train_size: int, agreement: Any, seed: int, log_fn: LogFn | None = None):
        super().__init__(schedule, agreement, None, seed, log_fn)
        self.train_size = train_size
        self.stages: list[IndexStage] = []
        self.updates = 0

    def _enter(self, stretch: Stretch) -> list[int]:
        n = self.schedule.samples_for(stretch)
        step = stretch.start_step
        if not stretch.is_update:  # the draw dynamic_select makes in its warm-up
            rows, _ = uniform_draw(self.train_size, n, seeded_generator(self.seed, "warmup", stretch.cycle))
            self.log.write_record(step, {"kind": "warmup", "step": step, "num_steps": stretch.num_steps,
                                         "stretch": stretch.index, "stages": [], "indices": rows, "seconds": 0.0})
            return rows
        start = time.perf_counter()
        first = next((i for i, s in enumerate(self.stages) if s.due(step)), len(self.stages))
        rows = self.stages[first - 1].out if first > 0 and self.stages[first - 1].out is not None else \
            list(range(self.train_size))
        trace = []
        for i, st in enumerate(self.stages):
            entry = {"stage": i, "label": st.stage.label, "rows_in": len(rows)}
            if i < first and st.out is not None:
                entry["action"] = "kept"  # not due, nothing before it changed: what it last handed on
                trace.append({**entry, "rows_in": None, "rows_out": len(st.out)})
                continue
            if not st.stage.is_active(step):
                entry["action"] = "warm-up"
            else:
                spent = st.seconds
                rows = st.apply(rows, stretch, n)
                st.last_run = step
                st.decisions += 1
                entry["action"] = "decided"
                entry["seconds"] = round(st.seconds - spent, 4)
            st.out = list(rows)
            trace.append({**entry, "rows_out": len(rows)})
        if first == len(self.stages) and self.stages and self.stages[-1].out is not None:
            rows = list(self.stages[-1].out)
        ordered = any(t["label"].startswith("reorder:") and t["action"] in ("decided", "kept") for t in trace)
        rows, fitted = fit_budget(rows, n, ordered, seeded_generator(self.seed, "lego-fit", stretch.index))
        seconds = time.perf_counter() - start
        self.seconds += seconds
        self.updates += 1
        self.history.append({"step": step, "seconds": seconds})
        self.log.write_record(step, {"kind": "update", "update": self.updates - 1, "step": step,
                                     "num_steps": stretch.num_steps, "stretch": stretch.index, "stages": trace,
                                     "fitted": fitted, "indices": rows, "seconds": round(seconds, 4)})
        self.info("pipeline update %d at step %d: %s -> %d rows in %.2fs", self.updates, step,
                  ", ".join(f"{t['label']} {t['action']}" + (f" {t['rows_in']}->{t['rows_out']}"
                                                              if t["action"] == "decided" else "") for t in trace),
                  len(rows), seconds)
        return rows

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "updates": self.updates, "stages": [s.state_dict() for s in self.stages]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.updates = int(state.get("updates", 0))
        for st, saved in zip(self.stages, state["stages"]):
            st.load_state_dict(saved)


# ---------------------------------------------------------------------------------------------- the mode
class LegoMode(ModeChecks):
    name = "lego"

    @classmethod
    def check_args(cls, args: Any) -> None:
        for key in ("update_step", "update_times"):
            if getattr(args, key) is None:
                raise ConfigError(f"{key}: required with train_type: dynamic_lego (an integer: the steps between "
                                  "two pipeline updates, and the updates per cycle)")
        if args.update_times >= 0 and args.warmup_step + args.update_step * args.update_times == 0:
            raise ConfigError("warmup_step/update_step/update_times: the schedule has no steps; "
                              "set warmup_step >= 1 or update_step, update_times >= 1")

    @classmethod
    def keeps_domains_apart(cls, component: Any) -> bool:
        return any(s.family == "mixer" for s in component.stages)

    @classmethod
    def needs_logits(cls, component: Any) -> bool:
        return any(s.family == "weighter" or (s.family == "mixer" and s.built.needs & {"losses", "excess"})
                   for s in component.stages)

    @classmethod
    def data_columns(cls, component: Any) -> list[str]:
        return [s.built.column for s in component.stages if s.family == "reorder" and s.built.column]

    @classmethod
    def check_config(cls, cfg: dict[str, Any], component: Any, yaml_dir: Any) -> None:
        for s in component.stages:
            where = f"pipeline '{component.key}': stage {s.written + 1} ({s.label})"
            comp = s.built
            if s.family == "mixer":
                if "router" in comp.needs or ("excess" in comp.needs and not s.loss_space):
                    raise ConfigError(f"{where}: mixer '{comp.name}' cannot run as a pipeline stage (it needs "
                                      f"{'a reference model' if 'excess' in comp.needs else 'per-domain eval sets'}"
                                      " beside the training forward); allowed mixers: static, random, odm, doremi")
                MixMode.check_config(cfg, comp, yaml_dir)
            elif s.family == "reorder":
                if comp.competence(0, 1) is not None:
                    raise ConfigError(f"{where}: reorderer with pacing '{comp.params.pacing}' cannot run as a "
                                      "pipeline stage (it draws from a growing share of every row, not from the "
                                      "update's rows); allowed: pacing: none")
            elif s.family == "selector" and s.mode == "filter" and getattr(comp.params, "random_share", 0):
                logger.warning("[DataFlex] %s: random_share also applies to the filter's pool", where)

    def __init__(self, ctx: ModeContext):
        self.ctx = ctx
        self.pipeline = ctx.component
        fa, targs = ctx.fa, ctx.args
        total = ctx.steps(True, fa.update_step, fa.update_times)
        self.schedule = Schedule.build(fa.warmup_step, fa.update_step, fa.update_times, ctx.global_batch, total)
        self.round = LegoRound(self.schedule, len(ctx.train), ctx.agreement, targs.seed, log_fn=ctx.trainer.log)
        self.weighters: list[tuple[int, Stage, WeightMode]] = []
        self.mixers: list[MixStage] = []
        self.reweighters: list[ReweightStage] = []  # mixers acting on the loss (at most one)
        for i, s in enumerate(self.pipeline.stages):
            if s.loss_space:
                self.reweighters.append(ReweightStage(s, i, self, total))
            elif s.family == "selector":
                self.round.stages.append(SelectStage(s, i, self))
            elif s.family == UNIFORM:
                self.round.stages.append(UniformStage(s, i, targs.seed))
            elif s.family == "mixer":
                stage = MixStage(s, i, self, total)
                self.mixers.append(stage)
                self.round.stages.append(stage)
            elif s.family == "reorder":
                self.round.stages.append(ReorderStage(s, i, self))
            else:
                wctx = copy.copy(ctx)  # the weighter's own view: its component, its records
                wctx.component = s.built
                wm = WeightMode(wctx)
                wm.round.warmup_step = s.warmup_step
                self.weighters.append((i, s, wm))
        targs.max_steps = total  # the LR schedule spans exactly the schedule
        self.rows = ScheduledRows(ctx, self.round.rows, lambda: self.schedule.total_steps,
                                  add=self.add_domains if self.mixers or self.reweighters else None,
                                  before=self.weigh_step)

    # ------------------------------------------------------------------ the step's data
    def train_loader(self, default: Callable[[], Any]) -> Any:
        return self.rows.train_loader(default)

    def num_examples(self, dataloader: Any, default: Callable[[Any], int]) -> int:
        return self.rows.num_examples(dataloader, default)

    def step_batches(self, epoch_iterator: Any, num_batches: int, device: Any, default: Callable) -> Any:
        for _, _, wm in self.weighters:
            wm.micro = 0
        return self.rows.step_batches(epoch_iterator, num_batches, device, default)

    def add_domains(self, batch: dict[str, Any]) -> None:
        domain_of = (self.mixers or self.reweighters)[0].domain_of
        batch[DOMAIN_KEY] = torch.tensor([domain_of(i) for i in batch[INDEX_KEY].tolist()], dtype=torch.long)

    def weigh_step(self, batches: list[dict[str, Any]]) -> None:
        """The step's weights before its first backward: a loss-space mixer's domain weights (after its
        update when it is due), and weighters of scope global_batch; they multiply."""
        step = self.ctx.step
        logs: dict[str, float] = {}
        for rw in self.reweighters:
            weights = rw.weigh_step(batches)
            for b, w in zip(batches, weights or []):
                b[WEIGHT_KEY] = w if b.get(WEIGHT_KEY) is None else b[WEIGHT_KEY] * w
        for _, s, wm in self.weighters:
            if wm.component.params.scope != "global_batch" or not wm.round.active(step):
                continue
            before = [b.get(WEIGHT_KEY) for b in batches]
            wm.weigh_step(batches)
            for b, w in zip(batches, before):
                if w is not None:
                    b[WEIGHT_KEY] = b[WEIGHT_KEY] * w
            logs.update({k.replace("dataflex/", f"dataflex/{s.component}_"): v for k, v in wm.round.last_logs.items()})
        if logs:
            self.ctx.pending_logs = logs

    def loss_hook(self) -> Callable | None:
        step = self.ctx.step
        micro = [wm for _, _, wm in self.weighters
                 if wm.component.params.scope == "micro_batch" and wm.round.active(step)]
        observe = [m for m in self.mixers if "losses" in m.mixer.needs]
        if not micro and not observe and not self.reweighters:
            return None

        def hook(signals: LossSignals) -> torch.Tensor | None:
            for m in observe:
                m.observe(signals.domains, signals.sums.detach(), signals.counts)
            for rw in self.reweighters:
                rw.observe(signals)
            weights = signals.weights
            for wm in micro:
                w = wm.weigh_micro(signals)
                weights = w if weights is None else weights * w.to(weights.dtype)
                self.ctx.pending_logs = {**self.ctx.pending_logs, **wm.round.last_logs}
            return weights

        return hook

    def loss_inputs(self, inputs: dict[str, Any]) -> dict[str, Any]:
        for _, _, wm in self.weighters:
            inputs = wm.loss_inputs(inputs)
        return inputs

    # ------------------------------------------------------------------ records and state
    def stage_entries(self) -> list[dict[str, Any]]:
        out = []
        for i, s in enumerate(self.pipeline.stages):
            comp = s.built
            entry = {"stage": i, "family": s.family, "component": s.component, "label": s.label,
                     "name": comp.name if comp is not None else None, "warmup_step": s.warmup_step,
                     "every": s.every, "budget": s.takes_budget, "space": "index" if s.index_space else "loss",
                     "folder": stage_folder(i, s) if comp else None,
                     "params": comp.params.to_dict() if comp is not None else None}
            if s.family == "selector":
                entry.update(mode=s.mode, keep_ratio=s.keep_ratio if s.mode == "filter" else None)
            if s.family == "weighter":
                entry["scope"] = comp.params.scope
            out.append(entry)
        return out

    def schedule_digest(self) -> list[Any]:
        stages = [[e["label"], e["name"], e["warmup_step"], e["every"], e.get("mode"), e.get("keep_ratio"),
                   fingerprint({k: v for k, v in (e["params"] or {}).items() if k != "cache_dir"})]
                  for e in self.stage_entries()]
        return stretch_schedule_digest(self.schedule) + [fingerprint(stages)]

    def schedule_manifest(self) -> dict[str, Any]:
        return {**stretch_schedule_manifest(self.schedule), "stages": self.stage_entries()}

    def round_state(self) -> dict[str, Any]:
        state = {**self.round.state_dict(), "weighters": [wm.round.state_dict() for _, _, wm in self.weighters]}
        if self.reweighters:  # statistics accumulate on every rank: the checkpoint keeps their sum
            state["reweighters"] = [
                rw.state_dict(DomainStats.from_flat(self.ctx.agreement.all_reduce(
                    f"checkpoint: stage {rw.index} statistics", rw.stats.flat()))) for rw in self.reweighters]
        return state

    def load_round_state(self, state: dict[str, Any]) -> None:
        self.round.load_state_dict(state)
        for (_, _, wm), saved in zip(self.weighters, state.get("weighters", [])):
            wm.round.load_state_dict(saved)
        for rw, saved in zip(self.reweighters, state.get("reweighters", [])):
            rw.load_state_dict(saved, self.ctx.rank)

    def start(self, log: RunLog) -> None:
        for st in self.round.stages:
            if st.stage.built is not None:
                st.log = RunLog(log.folder, stage_folder(st.index, st.stage), enabled=log.enabled)
        for rw in self.reweighters:
            rw.log = RunLog(log.folder, stage_folder(rw.index, rw.stage), enabled=log.enabled)
        for i, s, wm in self.weighters:
            sub = RunLog(log.folder, stage_folder(i, s), enabled=log.enabled)
            wm.round.log = sub
            wm.ctx.resumed_at = self.ctx.resumed_at
            wm.start(sub)

    def describe(self) -> None:
        logger.info("[DataFlex] pipeline '%s': %s", self.pipeline.key, self.pipeline.describe())
        describe_schedule(self, self.schedule)

    def metrics(self) -> dict[str, Any]:
        out: dict[str, Any] = {"dataflex_updates": self.round.updates}
        for i, _, wm in self.weighters:  # each weighter stage's range of weights (and its warning when flat)
            out.update({k.replace("dataflex_", f"dataflex_stage_{i}_"): v for k, v in wm.round.range_metrics().items()})
        return out

    def finish_files(self) -> list[str]:
        return [path for rw in self.reweighters for path in rw.finish(self.ctx.args.output_dir)]
