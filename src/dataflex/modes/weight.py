"""``dynamic_weight``: a weighter gives every sample of a step a weight inside the step's loss.

LLaMA-Factory's own loader stays (its sampler, shuffling and epochs); each row carries its index.
With ``scope: global_batch`` the weights of a step are decided over all its micro-batches on all
ranks before the step's first backward; with ``scope: micro_batch`` each micro-batch is weighted
from its own training forward. The weighted loss is the model's loss plus a correction term.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch.utils.data import Dataset

from ..core.records import RunLog
from ..core.rounds import LogFn, Round
from ..dist.agreement import AgreedFailure, Agreement
from ..errors import SelectionError
from ..scoring.engine import eval_mode
from ..scoring.losses import mean_losses, sample_loss_sums, supervised_logits, token_loss_sums
from ..values import NEAR_UNIFORM_WEIGHTS
from ..weighters.base import WeightContext, WeightSignals
from .base import BATCH_KEYS, INDEX_KEY, WEIGHT_KEY, ModeChecks, ModeContext
from .loss import LossSignals

logger = logging.getLogger("dataflex")


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

    def __init__(self, weighter: Any, warmup_step: int, agreement: Agreement, log: RunLog | None, seed: int,
                 component: str, log_fn: LogFn | None = None):
        super().__init__(agreement, log, seed, log_fn)
        self.weighter = weighter
        self.warmup_step = warmup_step
        self.component = component
        self.steps = 0
        self.low: float | None = None  # the smallest and largest weight of the run (None: none weighted yet)
        self.high: float | None = None
        self.partial_range = False  # resumed from a checkpoint that did not keep the range

    def active(self, step: int) -> bool:
        return step >= self.warmup_step

    def decide(self, step: int, local: list[LocalSignals], micro: int | None = None) -> list[torch.Tensor]:
        """Weights for this rank's micro-batches ``local`` (one tensor each), from every rank's signals.

        The step's samples are ordered micro-batch by micro-batch, and inside one by rank, as a
        distributed sampler lays them out. ``micro`` marks a micro-batch-scope decision.
        """
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
        self.low = stats["min"] if self.low is None else min(self.low, stats["min"])
        self.high = stats["max"] if self.high is None else max(self.high, stats["max"])
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
        return {"component": self.weighter.state_dict(), "steps": self.steps, "range": [self.low, self.high]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("component"):
            self.weighter.load_state_dict(state["component"])
        self.steps = int(state.get("steps", 0))
        # a checkpoint written before the range was kept: the range of the steps after it only
        self.low, self.high = state.get("range") or [None, None]
        self.partial_range = "range" not in state and self.steps > 0

    def range_metrics(self) -> dict[str, float]:
        """The run's smallest and largest weight (``train_results.json``), and on rank 0 a warning when every
        weight stayed in a band :data:`~dataflex.values.NEAR_UNIFORM_WEIGHTS` wide: the run then trained almost
        as plain training would, which a user comparing it with plain training needs to know."""
        if self.low is None or self.high is None:
            return {}
        if self.rank == 0 and self.high - self.low < NEAR_UNIFORM_WEIGHTS and not self.partial_range:
            logger.warning("[DataFlex] weighter '%s': every weight of its %d weighted step(s) stayed within "
                           "[%.4f, %.4f]: the loss was weighted almost as plain training weighs it; expect plain "
                           "training's result (what spreads this weighter's weights: docs/weighters/%s.md)",
                           self.weighter.name, self.steps, self.low, self.high, self.weighter.name)
        return {"dataflex_weight_min": self.low, "dataflex_weight_max": self.high}


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


class IndexedRows(Dataset):
    """The training set with each row's index added under ``INDEX_KEY``."""

    def __init__(self, dataset: Any):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {**self.dataset[i], INDEX_KEY: int(i)}


class IndexCollator:
    """Collates rows with the wrapped collator and carries their indices as a tensor."""

    def __init__(self, collator: Any):
        self.collator = collator

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        ids = [f.pop(INDEX_KEY) for f in features]
        batch = self.collator(features)
        batch[INDEX_KEY] = torch.tensor(ids, dtype=torch.long)
        return batch


class WeightMode(ModeChecks):
    name = "weight"
    orders_rows = False  # LLaMA-Factory's loader and sampler stay

    @classmethod
    def check_steps(cls, cfg: dict[str, Any], component: Any) -> None:
        ignored = [k for k in ("update_step", "update_times") if cfg.get(k) is not None]
        if ignored:
            logger.warning("[DataFlex] %s: ignored with train_type: dynamic_weight (weights are computed at every "
                           "step after warmup_step)", ", ".join(ignored))

    @classmethod
    def needs_logits(cls, component: Any) -> bool:
        return True

    def __init__(self, ctx: ModeContext):
        self.ctx = ctx
        self.component = ctx.component
        fa, targs = ctx.fa, ctx.args
        if fa.train_step:
            targs.max_steps = fa.train_step
        self.round = WeightRound(self.component, fa.warmup_step, ctx.agreement,
                                 None, targs.seed, ctx.spec.key)
        self.micro = 0

    def start(self, log: RunLog) -> None:
        if self.ctx.resumed_at is not None:  # the weights of steps the checkpoint has not seen are written again
            at = self.ctx.resumed_at
            log.truncate("weights.jsonl", lambda line: line.get("step", 0) < at)

    # ------------------------------------------------------------------ the step's data
    def train_loader(self, default: Callable[[], Any]) -> Any:
        t = self.ctx.trainer
        dataset, collator = t.train_dataset, t.data_collator
        t.train_dataset, t.data_collator = IndexedRows(dataset), IndexCollator(collator)
        try:
            return default()
        finally:
            t.train_dataset, t.data_collator = dataset, collator

    def num_examples(self, dataloader: Any, default: Callable[[Any], int]) -> int:
        return default(dataloader)

    def step_batches(self, epoch_iterator: Any, num_batches: int, device: Any, default: Callable) -> Any:
        batches, num_items = default(epoch_iterator, num_batches, device)
        self.micro = 0
        if batches and self.round.active(self.ctx.step) and self.component.params.scope == "global_batch":
            self.weigh_step(batches)
        return batches, num_items

    def prepare(self, step: int) -> None:
        ctx = self.ctx
        ctx.agreement.run(f"weights of step {step}: preparing",
                          lambda: self.component.prepare(WeightContext(step, ctx.engine(), ctx.eval)))

    def weigh_step(self, batches: list[dict[str, Any]]) -> None:
        """Global-batch scope: signals of this rank's micro-batches -> the step's weights."""
        needs = self.component.needs
        step = self.ctx.step
        self.prepare(step)
        local: list[LocalSignals] = []
        with self.ctx.agreement.section(f"weights of step {step}: scoring the step's samples"):
            for b in batches:
                local.append(self.signals(b, needs))
        weights = self.round.decide(step, local)
        for b, w in zip(batches, weights):
            b[WEIGHT_KEY] = w
        self.ctx.pending_logs = dict(self.round.last_logs)

    def signals(self, batch: dict[str, Any], needs: frozenset[str]) -> LocalSignals:
        labels = batch["labels"]
        tokens = (labels[:, 1:] != -100).sum(dim=1)
        ids = batch[INDEX_KEY].tolist()
        if not needs:
            return LocalSignals(ids, tokens)
        model = self.ctx.trainer.model
        device = self.ctx.args.device
        inputs = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()
                  if k not in BATCH_KEYS and k != "labels"}
        inputs["use_cache"] = False
        labels = labels.to(device)
        losses = embeddings = None
        with eval_mode(model), torch.no_grad():
            if "embeddings" in needs:
                from ..scoring.embeddings import pool_states

                comp = self.component
                out = model(**inputs, output_hidden_states=True)
                embeddings = pool_states(out.hidden_states, inputs.get("attention_mask"), comp.embedding_layer,
                                         comp.embedding_pooling).cpu()
                if "losses" in needs:
                    losses = mean_losses(*sample_loss_sums(out.logits, labels)).cpu()
            elif "losses" in needs:
                losses = mean_losses(*token_loss_sums(*supervised_logits(model, inputs, labels))).cpu()
        return LocalSignals(ids, tokens, losses, embeddings)

    # ------------------------------------------------------------------ the loss
    def loss_hook(self) -> Callable | None:
        micro_scope = self.component.params.scope == "micro_batch" and self.round.active(self.ctx.step)
        return self.weigh_micro if micro_scope else None

    def loss_inputs(self, inputs: dict[str, Any]) -> dict[str, Any]:
        if "embeddings" in self.component.needs:
            return {**inputs, "output_hidden_states": True}
        return inputs

    def weigh_micro(self, signals: LossSignals) -> torch.Tensor:
        """Micro-batch scope: weights over this micro-batch on every rank, from its training forward."""
        step, micro = self.ctx.step, self.micro
        self.micro += 1
        needs = self.component.needs
        self.prepare(step)
        losses = embeddings = None
        if "losses" in needs:
            losses = mean_losses(signals.sums.detach(), signals.counts).cpu()
        if "embeddings" in needs:
            from ..scoring.embeddings import pool_states

            comp = self.component
            embeddings = pool_states([h.detach() for h in signals.outputs.hidden_states],
                                     signals.inputs.get("attention_mask"), comp.embedding_layer,
                                     comp.embedding_pooling).cpu()
        local = LocalSignals(signals.ids.tolist(), signals.counts.cpu(), losses, embeddings)
        (w,) = self.round.decide(step, [local], micro=micro)
        self.ctx.pending_logs = dict(self.round.last_logs)
        return w


    # ------------------------------------------------------------------ records and state
    def schedule_digest(self) -> None:
        return None

    def schedule_manifest(self) -> dict[str, Any]:
        return {"warmup_step": self.ctx.fa.warmup_step, "global_batch": self.ctx.global_batch}

    def round_state(self) -> dict[str, Any]:
        return self.round.state_dict()

    def load_round_state(self, state: dict[str, Any]) -> None:
        self.round.load_state_dict(state)

    def describe(self) -> None:
        pass

    def metrics(self) -> dict[str, Any]:
        return self.round.range_metrics()

    def finish_files(self) -> list[str]:
        return []
