"""``dynamic_mix``: a mixer sets the proportion of each domain (training dataset) per stretch.

Every domain is tokenized on its own (:mod:`dataflex.integration`), so each row belongs to one
domain. The round turns proportions into rows (:class:`~dataflex.core.sampling.DomainSampler`),
accumulates per-domain statistics from the training forwards for the mixer, and carries DoReMi's
per-domain loss weights into the loss.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from ..core.records import RunLog
from ..core.rounds import LogFn, StretchRound
from ..core.sampling import DomainSampler, largest_remainder
from ..dist.agreement import AgreedFailure, Agreement
from ..errors import ConfigError, SelectionError
from ..mixers.base import DomainStats, MixContext, starting_proportions
from ..schedule import Schedule, Stretch
from ..seeding import seeded_generator
from ..values import names, read_proportions, truthy
from .base import DOMAIN_KEY, INDEX_KEY, WEIGHT_KEY, ModeChecks, ModeContext
from .loss import LossSignals
from .rows import ScheduledRows
from .run import describe_schedule, stretch_schedule_digest, stretch_schedule_manifest

logger = logging.getLogger("dataflex")


# ---------------------------------------------------------------------------------------------- shared with pipelines
def domain_sample_weights(alpha: list[float], domains: torch.Tensor, global_domain_tokens: torch.Tensor) -> torch.Tensor:
    """Per-sample weights w_i = α_d(i) N / N_d(i) of the α-weighted domain loss.

    ``global_domain_tokens`` are the step's supervised tokens per domain over all ranks, so that
    Σ_i w_i S_i / N = Σ_d α_d S_d / N_d: each domain's mean token loss, weighted by α.
    """
    a = torch.tensor(alpha, dtype=torch.float64)
    n_d = global_domain_tokens.double()
    total = n_d.sum()
    factor = torch.where(n_d > 0, a * total / n_d.clamp(min=1), torch.zeros_like(a))
    return factor[domains.long().cpu()]


def step_domain_weights(agreement: Agreement, step: int, alpha: list[float],
                        batches: list[dict[str, Any]]) -> list[torch.Tensor]:
    """The weights of one step's micro-batches (each carrying its rows' domains) under α: the step's
    supervised tokens per domain are summed over its micro-batches and every rank first."""
    local = torch.zeros(len(alpha), dtype=torch.float64)
    for b in batches:
        tokens = (b["labels"][:, 1:] != -100).sum(dim=1).double()
        local.index_add_(0, b[DOMAIN_KEY], tokens)
    total = agreement.all_reduce(f"step {step}: tokens per domain", local)
    return [domain_sample_weights(alpha, b[DOMAIN_KEY], total) for b in batches]


def decide_mixture(agreement: Agreement, label: str, mixer: Any, ctx: MixContext) -> Any:
    """The mixer's decision on ``ctx`` (rank 0 decides, every rank gets it), its proportions checked and
    normalised; ``label`` names the update in a failure."""
    k = len(ctx.domains)

    def decide():
        d = mixer.update(ctx)
        props = [float(x) for x in d.proportions]
        if len(props) != k or any(not math.isfinite(x) or x < 0 for x in props) or sum(props) <= 0:
            raise ValueError(f"mixer returned proportions {props}; expected {k} numbers >= 0, not all 0")
        s = sum(props)
        d.proportions = [x / s for x in props]
        return d

    return agreement.share(f"{label}: the decision", decide)


def loss_weight_logs(domains: list[str], loss_weights: list[float] | None, excess: list[float] | None) -> dict[str, float]:
    """The trainer's log lines of a DoReMi-style update: α and λ per domain."""
    logs = {}
    if loss_weights is not None:
        logs.update({f"dataflex/loss_weight_{d}": round(w, 6) for d, w in zip(domains, loss_weights)})
    if excess:
        logs.update({f"dataflex/excess_loss_{d}": round(x, 6) for d, x in zip(domains, excess)})
    return logs


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
                 scorer: Callable[[], Any], agreement: Agreement, log: RunLog | None, seed: int, component: str,
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
        return domain_sample_weights(self.loss_weights, domains, global_domain_tokens)

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
            decision = decide_mixture(self.agreement, f"mixture update {self.updates + 1}", self.mixer, ctx)
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
        logs.update(loss_weight_logs(self.setup.domains, self.loss_weights, decision.summary.get("excess_loss")))
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


class MixMode(ModeChecks):
    name = "mix"
    domains_apart = True

    @classmethod
    def check_steps(cls, cfg: dict[str, Any], component: Any) -> None:
        if component.every_step:
            if cfg.get("update_step") not in (None, 1) or cfg.get("update_times") not in (None, -1):
                logger.warning("[DataFlex] mixer '%s' updates after every optimizer step: update_step and update_times "
                               "are ignored", component.name)
        elif not truthy(cfg.get("static_mix", False)):
            for key in ("update_step", "update_times"):
                if cfg.get(key) is None:
                    raise ConfigError(f"{key}: required with train_type: dynamic_mix unless static_mix is true "
                                      "(an integer; update_times -1: until the end)")

    @classmethod
    def needs_logits(cls, component: Any) -> bool:
        return bool(component.needs & {"losses", "excess"})

    @classmethod
    def check_config(cls, cfg: dict[str, Any], mixer: Any, yaml_dir: Any) -> None:
        domains = names(cfg.get("dataset"))
        if not domains:
            raise ConfigError("dataset: dynamic_mix needs the training datasets (the domains), e.g. dataset: a,b")
        if len(set(domains)) != len(domains):
            raise ConfigError(f"dataset: {', '.join(domains)} names a dataset twice; allowed: each domain once")
        if cfg.get("mix_strategy", "concat") != "concat":
            raise ConfigError(f"mix_strategy: '{cfg['mix_strategy']}' cannot be used with dynamic_mix (the mixer "
                              "draws from each dataset itself); allowed: concat")
        if (cfg.get("val_size") or 0) > 0:
            raise ConfigError("val_size: cannot be used with dynamic_mix (rows of one domain would be split off as "
                              "eval); name an eval_dataset instead")
        if cfg.get("tokenized_path"):
            raise ConfigError("tokenized_path: cannot be used with dynamic_mix (a pre-tokenized set does not say "
                              "which row comes from which domain)")
        if cfg.get("init_mixture_proportions") is not None:
            cfg["init_mixture_proportions"] = read_proportions(cfg["init_mixture_proportions"], domains, yaml_dir)
        mixer.check_domains(cfg, domains)
        if len(domains) == 1:
            logger.warning("[DataFlex] dynamic_mix with one dataset (%s): there is nothing to mix", domains[0])

    def __init__(self, ctx: ModeContext):
        self.ctx = ctx
        self.component = ctx.component
        fa, targs = ctx.fa, ctx.args
        mixer = self.component
        info = ctx.data
        if info is None or not info.parts or not info.exact:
            raise ConfigError("dataset: dynamic_mix could not tell which rows come from which dataset")
        domains = [p[0] for p in info.parts]
        sizes = [p[2] - p[1] for p in info.parts]
        rule = fa.mixture_sample_rule or "mixture"
        initial, how = starting_proportions(rule, sizes, fa.init_mixture_proportions, domains, mixer)
        if ctx.rank == 0:
            logger.info("[DataFlex] domains %s with %s rows; starting proportions %s: %s", domains, sizes,
                        [round(x, 4) for x in initial], how)
        if mixer.every_step:  # e.g. ODM: a decision after every optimizer step
            update_step, update_times = 1, -1
        else:
            update_step, update_times = fa.update_step or 0, fa.update_times if fa.update_times is not None else 0
        total = ctx.steps(False, update_step, update_times if not fa.static_mix else -1)
        self.schedule = Schedule.build(fa.warmup_step, update_step, 0 if fa.static_mix else update_times,
                                       ctx.global_batch, total, cycles=False)
        targs.max_steps = total
        mixer.setup(domains, sizes, initial, total, fa.warmup_step)
        if fa.freeze_gate:
            freeze_routers(ctx.trainer.model, ctx.rank)
        eval_sets = None
        if "router" in mixer.needs:
            eval_sets = [ctx.prepare(ds, "evaluation") for ds in info.mixer_eval]
        setup = MixSetup(domains, sizes, initial, rule, bool(fa.static_mix), ctx.per_device, ctx.ga,
                         ctx.world, total, eval_sets)
        self.sampler = DomainSampler([tuple(p) for p in info.parts], targs.seed)
        self.round = MixRound(self.schedule, mixer, self.sampler, setup, ctx.engine, ctx.agreement,
                              None, targs.seed, ctx.spec.key,
                              log_fn=ctx.trainer.log)
        self.reference = None
        if mixer.reference_model_path:
            from ..scoring.reference import ReferenceModel

            self.reference = ReferenceModel(mixer.reference_model_path, ctx.trainer.model, targs.device,
                                            work=ctx.work)
        self.rows = ScheduledRows(ctx, self.round.rows, lambda: self.schedule.total_steps, add=self.add_domains,
                                  before=self.weigh_domains)

    # ------------------------------------------------------------------ the step's data and loss
    def train_loader(self, default: Callable[[], Any]) -> Any:
        return self.rows.train_loader(default)

    def num_examples(self, dataloader: Any, default: Callable[[Any], int]) -> int:
        return self.rows.num_examples(dataloader, default)

    def step_batches(self, epoch_iterator: Any, num_batches: int, device: Any, default: Callable) -> Any:
        return self.rows.step_batches(epoch_iterator, num_batches, device, default)

    def add_domains(self, batch: dict[str, Any]) -> None:
        """Each row's domain, for the mixer's statistics and DoReMi's loss weights."""
        ids = batch[INDEX_KEY].tolist()
        batch[DOMAIN_KEY] = torch.tensor([self.sampler.domain_of(i) for i in ids], dtype=torch.long)

    def weigh_domains(self, batches: list[dict[str, Any]]) -> None:
        """DoReMi: per-sample weights of the α-weighted domain loss for this step's batches."""
        if self.round.loss_weights is None:
            return
        for b, w in zip(batches, step_domain_weights(self.ctx.agreement, self.ctx.step, self.round.loss_weights,
                                                     batches)):
            b[WEIGHT_KEY] = w

    def loss_hook(self) -> Callable | None:
        return self.observe if self.component.needs & {"losses", "excess"} else None

    def loss_inputs(self, inputs: dict[str, Any]) -> dict[str, Any]:
        return inputs

    def observe(self, signals: LossSignals) -> Any:
        """The mixer's statistics: what the training forward saw, per domain."""
        excess = None
        if self.reference is not None:
            excess = self.reference.excess_sums(signals.inputs, signals.labels, signals.logits.detach())
        self.round.observe(signals.domains, signals.sums.detach(), signals.counts, excess)
        return signals.weights

    # ------------------------------------------------------------------ records, state and the end
    def schedule_digest(self) -> list[Any]:
        return stretch_schedule_digest(self.schedule)

    def schedule_manifest(self) -> dict[str, Any]:
        return stretch_schedule_manifest(self.schedule)

    def round_state(self) -> dict[str, Any]:
        # statistics accumulate on every rank: the checkpoint keeps their sum (rank 0 resumes with it)
        total = self.ctx.agreement.all_reduce("checkpoint: mixing statistics", self.round.stats.flat())
        return {**self.round.state_dict(), "stats": DomainStats.from_flat(total).to_dict()}

    def load_round_state(self, round_state: dict[str, Any]) -> None:
        if self.ctx.rank != 0:
            round_state = {**round_state, "stats": DomainStats.zeros(len(self.round.setup.domains)).to_dict()}
        self.round.load_state_dict(round_state)

    def start(self, log: RunLog) -> None:
        pass

    def describe(self) -> None:
        describe_schedule(self, self.schedule)

    def metrics(self) -> dict[str, Any]:
        return {}

    def finish_files(self) -> list[str]:
        return self.round.finish(self.ctx.args.output_dir)


def freeze_routers(model: Any, rank: int) -> None:
    """``freeze_gate``: the mixture-of-experts routers stop training (nothing else does)."""
    from ..scoring.reference import router_modules

    routers = router_modules(model)
    if not routers:
        raise ConfigError("freeze_gate: true, but the model has no mixture-of-experts router to freeze")
    frozen = 0
    for _, module in routers:
        for p in module.parameters():
            if p.requires_grad:
                p.requires_grad_(False)
                frozen += p.numel()
    if rank == 0:
        logger.info("[DataFlex] freeze_gate: %d router(s) frozen (%d parameters)", len(routers), frozen)
