"""Rounds: where a mode's decisions are made, agreed across ranks and recorded.

A round is a plain object (no transformers, no LLaMA-Factory): the trainer mixin asks it for
the rows of a step (select, mix) or the weights of a step's samples (weight), and feeds it what
the training forward saw (mix). Every decision goes through :class:`~dataflex.core.agreement.Agreement`:
all ranks take part in computing it where the model is needed, rank 0's result is broadcast,
and a failure anywhere becomes one :class:`~dataflex.errors.SelectionError` on every rank.

* :class:`SelectRound` - ``dynamic_select``: warm-up draws and selections, stretch by stretch.
* :class:`MixRound` - ``dynamic_mix``: proportions per stretch, turned into rows by
  :class:`~dataflex.core.sampling.DomainSampler`; per-domain statistics accumulated from the
  training forwards; per-domain loss weights (DoReMi).
* :class:`WeightRound` - ``dynamic_weight``: per-sample loss weights for every step.

Each round's :meth:`state_dict` is what goes into the HF checkpoint (:mod:`dataflex.core.state`).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from ..errors import SelectionError
from ..schedule import Schedule, Stretch
from ..seeding import seeded_generator
from .agreement import Agreement, AgreedFailure
from .records import RunLog
from .sampling import DomainSampler, largest_remainder

logger = logging.getLogger("dataflex")
LogFn = Callable[[dict[str, float]], None]


def _no_log(_: dict[str, float]) -> None:
    pass


def summary_scalars(prefix: str, values: Sequence[float]) -> dict[str, float]:
    """``{prefix_mean, prefix_min, prefix_max}`` of the finite ``values``."""
    finite = [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    if not finite:
        return {}
    t = torch.tensor(finite, dtype=torch.float64)
    return {f"{prefix}_mean": round(float(t.mean()), 6), f"{prefix}_min": round(float(t.min()), 6),
            f"{prefix}_max": round(float(t.max()), 6)}


class Round:
    """What every mode's round has: the protocol, the run's records, the time spent deciding."""

    what = "decision"

    def __init__(self, agreement: Agreement, log: RunLog, seed: int, log_fn: LogFn | None = None):
        self.agreement = agreement
        self.log = log
        self.seed = seed
        self.log_fn = log_fn or _no_log
        self.seconds = 0.0
        self.history: list[dict[str, Any]] = []

    @property
    def rank(self) -> int:
        return self.agreement.rank

    def info(self, msg: str, *args: Any) -> None:
        if self.rank == 0:
            logger.info("[DataFlex] " + msg, *args)

    def warning(self, msg: str, *args: Any) -> None:
        if self.rank == 0:
            logger.warning("[DataFlex] " + msg, *args)


# ---------------------------------------------------------------------------------------------- stretches
class StretchRound(Round):
    """select and mix: the schedule's stretches, each fed by one draw of ``G x steps`` rows."""

    def __init__(self, schedule: Schedule, agreement: Agreement, log: RunLog, seed: int, log_fn: LogFn | None = None):
        super().__init__(agreement, log, seed, log_fn)
        self.schedule = schedule
        self.stretch: Stretch | None = None
        self.indices: list[int] = []

    def rows(self, step: int) -> list[int]:
        """The ``G`` training rows of optimizer step ``step``, in the order ranks split them."""
        stretch = self.schedule.stretch_at(step)
        if self.stretch is None or self.stretch.index != stretch.index:
            self.indices = self._enter(stretch)
            self.stretch = stretch
        g = self.schedule.global_batch
        offset = (step - stretch.start_step) * g
        return self.indices[offset: offset + g]

    def _enter(self, stretch: Stretch) -> list[int]:  # pragma: no cover - interface
        raise NotImplementedError

    def _order(self, n: int, stretch: Stretch) -> list[int]:
        """The seeded consumption order of a draw of ``n`` rows."""
        tag = stretch.number if stretch.is_update else f"stretch-{stretch.index}"
        return torch.randperm(n, generator=seeded_generator(self.seed, "order", tag)).tolist()

    def state_dict(self) -> dict[str, Any]:
        return {"stretch": self.stretch.index if self.stretch is not None else None, "indices": list(self.indices)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        index = state.get("stretch")
        if index is not None:
            self.stretch = self.schedule.stretches[int(index)]
            self.indices = [int(i) for i in state["indices"]]


class SelectRound(StretchRound):
    """``dynamic_select``: a seeded random draw per warm-up, a selector's choice per selection."""

    what = "selection"

    def __init__(self, schedule: Schedule, selector: Any, context: Callable[[Stretch, int], Any], train_size: int,
                 agreement: Agreement, log: RunLog, seed: int, component: str, log_fn: LogFn | None = None):
        super().__init__(schedule, agreement, log, seed, log_fn)
        self.selector = selector
        self.context = context
        self.train_size = train_size
        self.component = component

    def _enter(self, stretch: Stretch) -> list[int]:
        n = self.schedule.samples_for(stretch)
        if not stretch.is_update:
            from ..selectors.base import uniform_draw

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
        from ..selectors.base import SelectionResult

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
SAMPLE_RULES = ("mixture", "stratified", "uniform")


@dataclass
class MixSetup:
    """What a mixing round needs to know about the run."""

    domains: list[str]
    sizes: list[int]
    initial: list[float]  # proportions before the first update
    rule: str  # mixture_sample_rule
    static: bool  # static_mix: no mixer updates at all
    per_device: int
    grad_accum: int
    world_size: int
    total_steps: int
    eval_sets: list[Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class MixRound(StretchRound):
    """``dynamic_mix``: proportions per stretch, rows from them, statistics from the training forwards."""

    what = "mixture update"

    def __init__(self, schedule: Schedule, mixer: Any, sampler: DomainSampler, setup: MixSetup,
                 scorer: Callable[[], Any], agreement: Agreement, log: RunLog, seed: int, component: str,
                 log_fn: LogFn | None = None):
        super().__init__(schedule, agreement, log, seed, log_fn)
        self.mixer = mixer
        self.sampler = sampler
        self.setup = setup
        self.scorer = scorer
        self.component = component
        k = len(setup.domains)
        self.proportions = list(setup.initial)  # sampling proportions in force
        self.mixer_proportions = list(setup.initial)  # what the mixer last proposed (recorded)
        self.loss_weights: list[float] | None = mixer.initial_loss_weights() if mixer is not None else None
        self.stats = self._zero_stats(k)
        self.stats_since = 0  # step the stats start at
        self.updates = 0

    @staticmethod
    def _zero_stats(k: int):
        from ..mixers.base import DomainStats

        return DomainStats.zeros(k)

    # ------------------------------------------------------------------ what the training forward saw
    def observe(self, domains: torch.Tensor, loss_sums: torch.Tensor, tokens: torch.Tensor,
                excess_sums: torch.Tensor | None = None) -> None:
        """Per-sample sums of one micro-batch on this rank (summed over ranks at the next update)."""
        self.stats.add(domains, loss_sums, tokens, excess_sums)

    def sample_loss_weights(self, domains: torch.Tensor, global_domain_tokens: torch.Tensor) -> torch.Tensor | None:
        """Per-sample weights w_i = α_d(i) N / N_d(i) of the α-weighted domain loss (None: plain loss).

        ``global_domain_tokens`` are the step's supervised tokens per domain over all ranks, so that
        Σ_i w_i S_i / N = Σ_d α_d S_d / N_d: each domain's mean token loss, weighted by α.
        """
        if self.loss_weights is None:
            return None
        alpha = torch.tensor(self.loss_weights, dtype=torch.float64)
        n_d = global_domain_tokens.double()
        total = n_d.sum()
        factor = torch.where(n_d > 0, alpha * total / n_d.clamp(min=1), torch.zeros_like(alpha))
        return factor[domains.long().cpu()]

    # ------------------------------------------------------------------ stretches
    def _enter(self, stretch: Stretch) -> list[int]:
        decision_seconds = 0.0
        decision: dict[str, Any] | None = None
        if stretch.kind == "update" and not self.setup.static:
            start = time.perf_counter()
            decision = self._update(stretch)
            decision_seconds = time.perf_counter() - start
            self.seconds += decision_seconds
        rows, counts = self._draw(stretch)
        reshuffles = self.sampler.take_reshuffles()
        for name, epoch in reshuffles:
            self.info("domain '%s' used up all its rows: reshuffled (pass %d over the domain)", name, epoch + 1)
        record = {
            "kind": stretch.kind, "step": stretch.start_step, "num_steps": stretch.num_steps, "stretch": stretch.index,
            "mixer": self.mixer.name if self.mixer is not None else None, "component": self.component,
            "domains": self.setup.domains, "proportions": self.proportions, "counts": counts,
            "loss_weights": self.loss_weights, "indices": rows, "reshuffles": [list(r) for r in reshuffles],
            "seconds": round(decision_seconds, 4),
        }
        if decision is not None:
            record.update(decision)
        self.log.write_record(stretch.start_step, record)
        if stretch.kind != "hold" or stretch.index == 0:
            self.info("%s at step %d: proportions %s -> %s rows per domain for steps %d-%d%s",
                      "mixture update %d" % self.updates if decision is not None else stretch.kind,
                      stretch.start_step, [round(p, 4) for p in self.proportions], dict(zip(self.setup.domains, counts)),
                      stretch.start_step, stretch.end_step - 1,
                      f"; loss weights {[round(w, 4) for w in self.loss_weights]}" if self.loss_weights else "")
        return rows

    def _update(self, stretch: Stretch) -> dict[str, Any]:
        from ..mixers.base import DomainStats, MixContext

        k = len(self.setup.domains)
        label = f"mixture update {self.updates + 1} at step {stretch.start_step} (mixer '{self.mixer.name}')"
        try:
            total = self.agreement.all_reduce(f"mixture update {self.updates + 1}: statistics", self.stats.flat())
            ctx = MixContext(
                step=stretch.start_step, update=self.updates, domains=list(self.setup.domains),
                sizes=list(self.setup.sizes), proportions=list(self.proportions), stats=DomainStats.from_flat(total),
                steps_since=stretch.start_step - self.stats_since, total_steps=self.setup.total_steps, seed=self.seed,
                scorer=None, eval_sets=self.setup.eval_sets, rank=self.rank,
            )
            if self.mixer.needs & {"router"}:
                ctx.scorer = self.scorer()
                self.agreement.run(f"mixture update {self.updates + 1}: measuring", lambda: self.mixer.prepare(ctx))

            def decide():
                d = self.mixer.update(ctx)
                props = [float(x) for x in d.proportions]
                if len(props) != k or any(not math.isfinite(x) or x < 0 for x in props) or sum(props) <= 0:
                    raise ValueError(f"mixer returned proportions {props}; expected {k} numbers >= 0, not all 0")
                s = sum(props)
                d.proportions = [x / s for x in props]
                return d

            decision = self.agreement.share(f"mixture update {self.updates + 1}: the decision", decide)
        except AgreedFailure as err:
            raise SelectionError(f"{label} {err}") from None
        self.mixer_proportions = decision.proportions
        if self.setup.rule == "mixture":
            self.proportions = list(decision.proportions)
        self.loss_weights = decision.loss_weights
        stats = ctx.stats
        self.updates += 1
        self.stats = DomainStats.zeros(k)
        self.stats_since = stretch.start_step
        logs = {f"dataflex/proportion_{d}": round(p, 6) for d, p in zip(self.setup.domains, self.proportions)}
        for d, loss in zip(self.setup.domains, stats.mean_loss()):
            if loss is not None:
                logs[f"dataflex/domain_loss_{d}"] = round(loss, 6)
        if self.loss_weights is not None:
            logs.update({f"dataflex/loss_weight_{d}": round(w, 6) for d, w in zip(self.setup.domains, self.loss_weights)})
        excess = decision.summary.get("excess_loss")
        if excess:
            logs.update({f"dataflex/excess_loss_{d}": round(x, 6) for d, x in zip(self.setup.domains, excess)})
        self.log_fn(logs)
        self.history.append({"step": stretch.start_step, "proportions": list(self.proportions)})
        return {"update": self.updates - 1, "mixer_proportions": decision.proportions, "summary": decision.summary,
                "statistics": stats.to_dict()}

    def _draw(self, stretch: Stretch) -> tuple[list[int], list[int]]:
        n = self.schedule.samples_for(stretch)
        k = len(self.setup.domains)
        granularity = self.mixer.granularity if self.mixer is not None else "sample"
        if granularity == "micro_batch":
            s = self.setup
            blocks = s.grad_accum * s.world_size * stretch.num_steps
            gen = seeded_generator(self.seed, "mix-blocks", stretch.index)
            domains = torch.multinomial(torch.tensor(self.proportions, dtype=torch.float64), blocks, replacement=True,
                                        generator=gen).tolist()
            rows = self.sampler.draw_blocks(domains, s.per_device)
            counts = [domains.count(d) * s.per_device for d in range(k)]
            return rows, counts
        counts = largest_remainder(self.proportions, n)
        return self.sampler.draw(counts, stretch.index), counts

    def finish(self, output_dir: str) -> list[str]:
        if self.mixer is None or self.rank != 0:
            return []
        self.mixer.finish(self.schedule.total_steps)
        return self.mixer.outputs(output_dir)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "component": self.mixer.state_dict() if self.mixer is not None else {},
                "sampler": self.sampler.state_dict(), "proportions": self.proportions,
                "mixer_proportions": self.mixer_proportions, "loss_weights": self.loss_weights,
                "stats": self.stats.to_dict(), "stats_since": self.stats_since, "updates": self.updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        from ..mixers.base import DomainStats

        super().load_state_dict(state)
        if self.mixer is not None and state.get("component"):
            self.mixer.load_state_dict(state["component"])
        self.sampler.load_state_dict(state["sampler"])
        self.proportions = [float(x) for x in state["proportions"]]
        self.mixer_proportions = [float(x) for x in state["mixer_proportions"]]
        self.loss_weights = state["loss_weights"]
        self.stats = DomainStats.from_dict(state["stats"])
        self.stats_since = int(state["stats_since"])
        self.updates = int(state["updates"])


# ---------------------------------------------------------------------------------------------- weighting
@dataclass
class LocalSignals:
    """One micro-batch's signals on this rank."""

    indices: list[int]
    tokens: torch.Tensor
    losses: torch.Tensor | None = None
    embeddings: torch.Tensor | None = None


class WeightRound(Round):
    """``dynamic_weight``: per-sample weights of every step after the warm-up."""

    what = "weighting"

    def __init__(self, weighter: Any, warmup_step: int, agreement: Agreement, log: RunLog, seed: int, component: str,
                 log_fn: LogFn | None = None):
        super().__init__(agreement, log, seed, log_fn)
        self.weighter = weighter
        self.warmup_step = warmup_step
        self.component = component
        self.steps = 0

    def active(self, step: int) -> bool:
        return step >= self.warmup_step

    def decide(self, step: int, local: list[LocalSignals], micro: int | None = None) -> list[torch.Tensor]:
        """Weights for this rank's micro-batches ``local`` (one tensor each), from every rank's signals.

        The step's samples are ordered micro-batch by micro-batch, and inside one by rank, as a
        distributed sampler lays them out. ``micro`` marks a micro-batch-scope decision.
        """
        from ..weighters.base import WeightSignals

        label = f"weights of step {step}" + (f", micro-batch {micro}" if micro is not None else "")
        start = time.perf_counter()
        try:
            parts = self.agreement.gather(f"{label}: signals", local)

            def decide():
                order = [(m, r) for m in range(max(len(p) for p in parts)) for r in range(len(parts)) if m < len(parts[r])]
                chunks = [parts[r][m] for m, r in order]
                signals = WeightSignals(
                    step=step,
                    indices=[i for c in chunks for i in c.indices],
                    tokens=torch.cat([c.tokens.long() for c in chunks]),
                    losses=torch.cat([c.losses.double() for c in chunks]) if chunks[0].losses is not None else None,
                    embeddings=torch.cat([c.embeddings for c in chunks]) if chunks[0].embeddings is not None else None,
                )
                raw, summary = self.weighter.weights(signals)
                w = normalise_weights(torch.as_tensor(raw, dtype=torch.float64), signals.tokens)
                sizes = {(m, r): len(parts[r][m].indices) for m, r in order}
                mine: dict[int, list[list[float]]] = {r: [] for r in range(len(parts))}
                pos = 0
                for m, r in order:
                    mine[r].append(w[pos: pos + sizes[(m, r)]].tolist())
                    pos += sizes[(m, r)]
                return mine, w, signals.indices, summary

            mine, w, indices, summary = self.agreement.share(f"{label}: the decision", decide)
        except AgreedFailure as err:
            raise SelectionError(f"{label} (weighter '{self.weighter.name}') {err}") from None
        self.seconds += time.perf_counter() - start
        self.steps += 1
        stats = weight_stats(w)
        line = {"step": step, "indices": indices, "weights": [round(float(x), 6) for x in w], **stats}
        if micro is not None:
            line["micro"] = micro
        line.update({k: v for k, v in summary.items() if isinstance(v, (int, float)) or v is None})
        self.log.append("weights.jsonl", line)
        logs = {f"dataflex/weight_{k}": v for k, v in stats.items()}
        logs.update({f"dataflex/{k}": round(float(v), 6) for k, v in summary.items()
                     if isinstance(v, (int, float)) and not isinstance(v, bool)})
        self.last_logs = logs
        return [torch.tensor(x, dtype=torch.float64) for x in mine[self.rank]]

    def state_dict(self) -> dict[str, Any]:
        return {"component": self.weighter.state_dict(), "steps": self.steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("component"):
            self.weighter.load_state_dict(state["component"])
        self.steps = int(state.get("steps", 0))


def normalise_weights(w: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Weights rescaled to mean 1 over the samples with a supervised token; 1 for the others."""
    if len(w) != len(tokens):
        raise ValueError(f"weighter returned {len(w)} weights for {len(tokens)} samples")
    if bool(torch.isnan(w).any()) or bool((w < 0).any()) or bool(torch.isinf(w).any()):
        raise ValueError("weighter returned weights that are negative, infinite or NaN")
    out = torch.ones(len(w), dtype=torch.float64)
    valid = tokens > 0
    n = int(valid.sum())
    if n:
        total = float(w[valid].sum())
        if total <= 0:
            raise ValueError("weighter returned weight 0 for every sample with a supervised token")
        out[valid] = w[valid] * (n / total) if total != n else w[valid]
    return out


def weight_stats(w: torch.Tensor) -> dict[str, float]:
    """min, max, std and the effective sample size (Σw)² / Σw² of a step's weights."""
    w = w.double()
    ess = float(w.sum() ** 2 / w.square().sum()) if float(w.square().sum()) > 0 else 0.0
    return {"min": round(float(w.min()), 6), "max": round(float(w.max()), 6),
            "std": round(float(w.std(unbiased=False)), 6), "ess": round(ess, 4)}
