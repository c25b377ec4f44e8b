"""The mode protocol: what the trainer mixin asks of a mode, and what every mode shares.

A mode is built once per trainer from the run plan. The mixin forwards each HF hook to it (the
training loader, the step's batches, the loss, checkpoint state, the end of training); a mode
answers with its round and its component. The parent trainer's own hook is handed in as
``default`` so a mode can wrap it without knowing the trainer's class.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Callable

import torch

from ..core.records import RunLog, fingerprint
from ..dist.agreement import Agreement
from ..schedule import Schedule, rank_micro_batch, total_steps
from ..scoring.engine import ScoringEngine, dataset_lengths
from ..scoring.losses import sample_loss_sums

logger = logging.getLogger("dataflex")

# what DataFlex adds to a training batch (removed again before the model's forward)
INDEX_KEY = "dataflex_index"  # training-set rows of a batch (select, mix, weight)
WEIGHT_KEY = "dataflex_weight"  # per-sample loss weights of a batch
DOMAIN_KEY = "dataflex_domain"  # domain of each row (mix)
BATCH_KEYS = (INDEX_KEY, WEIGHT_KEY, DOMAIN_KEY)


def dataset_digest(dataset: Any) -> dict[str, Any]:
    """Identify a tokenized dataset cheaply: its size, all row lengths, and a sample of rows."""
    import hashlib
    import json

    if dataset is None:
        return {}
    if isinstance(dataset, dict):
        return {k: dataset_digest(v) for k, v in sorted(dataset.items())}
    n = len(dataset)
    h = hashlib.sha256()
    h.update(json.dumps(dataset_lengths(dataset)).encode())
    for i in sorted({(j * max(n - 1, 0)) // 63 for j in range(64)} if n else set()):
        row = dataset[i]
        h.update(json.dumps([row.get("input_ids"), row.get("labels")]).encode())
    return {"size": n, "sha256": h.hexdigest()[:16]}


def mean_losses(sums: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Per-sample mean token loss (NaN for a sample without supervised tokens), on the CPU."""
    return (sums.double() / counts.clamp(min=1)).masked_fill(counts == 0, float("nan")).cpu()


def _first(batch: list) -> Any:
    return batch[0]


class Mode:
    """One ``train_type`` inside the trainer. Subclasses set ``name`` and implement :meth:`setup`."""

    name = ""
    orders_rows = True  # the schedule decides which rows each step sees (LLaMA-Factory's sampler is unused)
    domains_apart = False  # every training dataset (domain) tokenized on its own, its rows known

    # ------------------------------------------------------------------ checks before training (class level)
    @classmethod
    def check_steps(cls, cfg: dict[str, Any], component: Any) -> None:
        """The mode's reading of ``update_step`` / ``update_times`` (raise ConfigError, or warn)."""

    @classmethod
    def needs_logits(cls, component: Any) -> bool:
        """Whether the training forward must return logits (per-sample losses of the training loss)."""
        return False

    @classmethod
    def check_config(cls, cfg: dict[str, Any], component: Any, yaml_dir: Any) -> None:
        """The mode's own checks of the raw config, last; may resolve values in ``cfg``."""

    @classmethod
    def data_columns(cls, component: Any) -> list[str]:
        """Raw dataset columns the mode needs, one value per training row (read while the data loads)."""
        return []

    def __init__(self, trainer: Any, plan: Any, data: Any):
        targs = trainer.args
        self.trainer = trainer
        self.plan = plan
        self.data = data
        self.fa = trainer.finetuning_args
        self.rank, self.world = targs.process_index, targs.world_size
        self.agreement = Agreement(self.rank, self.world)
        self.per_device = targs.per_device_train_batch_size
        self.ga = targs.gradient_accumulation_steps
        self.global_batch = self.per_device * self.ga * self.world
        self.spec = plan.spec
        self.component = plan.component
        self.train, self.collator = trainer.df_prepare(trainer.train_dataset, "training")
        self.eval = None
        self.eval_groups: list[tuple[str, int, int]] | None = None  # (name, start, end) per eval set, when several
        if trainer.eval_dataset is not None:
            ev = trainer.eval_dataset
            if isinstance(ev, dict):  # several eval sets: the components score against all of them together
                from datasets import concatenate_datasets

                self.eval_groups, start = [], 0
                for name, part in ev.items():
                    self.eval_groups.append((str(name), start, start + len(part)))
                    start += len(part)
                ev = concatenate_datasets(list(ev.values()))
            self.eval, _ = trainer.df_prepare(ev, "evaluation")
        self.component.check_data(len(self.train), len(self.eval) if self.eval is not None else None)
        self.scorer: ScoringEngine | None = None
        self.log: RunLog | None = None
        self.pending_logs: dict[str, float] = {}
        self.cache_dir = plan.cache_dir
        self.schedule: Schedule | None = None
        self.round: Any = None
        self.resumed_at: int | None = None
        self.resumed_from: str | None = None
        self.setup()

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:  # pragma: no cover - interface
        """Build the schedule (if any) and the round from the run plan and the trainer's arguments."""
        raise NotImplementedError

    def steps(self, cycles: bool, update_step: int, update_times: int) -> int:
        fa, targs = self.fa, self.trainer.args
        return total_steps(fa.warmup_step, update_step, update_times, self.global_batch,
                           num_train_epochs=targs.num_train_epochs, max_steps=targs.max_steps,
                           train_step=fa.train_step, rows=len(self.train), cycles=cycles)

    def engine(self) -> ScoringEngine:
        if self.scorer is None:
            t = self.trainer
            self.scorer = ScoringEngine(t.model, self.collator, t.args.device, agreement=self.agreement)
        return self.scorer

    def zero_stage(self) -> int | None:
        """The DeepSpeed ZeRO stage of this run, None without DeepSpeed."""
        t = self.trainer
        if not getattr(t, "is_deepspeed_enabled", False):
            return None
        plugin = getattr(t.accelerator.state, "deepspeed_plugin", None)
        return int(plugin.zero_stage) if plugin is not None else None

    def describe(self) -> None:
        """Say on rank 0 what runs: the component, its params, the schedule, DeepSpeed."""
        if self.rank != 0:
            return
        params = {k: v for k, v in self.component.params.to_dict().items() if v is not None}
        logger.info("[DataFlex] %s: component '%s' (%s '%s'), params %s", self.fa.train_type, self.spec.key,
                    self.component.kind[:-1], self.spec.name, params)
        if self.schedule is not None:
            logger.info("[DataFlex] schedule: %s", self.schedule.describe(self.round.what))
        stage = self.zero_stage()
        if stage is not None:
            logger.info("[DataFlex] DeepSpeed ZeRO-%d: %s", stage, "scoring runs on partitioned parameters"
                        if stage == 3 else "scoring runs on the full parameters each rank holds")

    # ------------------------------------------------------------------ the step's data
    def train_loader(self, default: Callable[[], Any]) -> Any:
        """select and mix: a loader of slots (``step * GA + micro``) that carry no data."""
        from torch.utils.data import DataLoader

        slots = range(self.planned_steps() * self.ga)
        return DataLoader(slots, batch_size=1, shuffle=False, collate_fn=_first)

    def num_examples(self, dataloader: Any, default: Callable[[Any], int]) -> int:
        return self.planned_steps() * self.global_batch

    def planned_steps(self) -> int:
        """The run's optimizer steps (select and mix: their schedule's)."""
        return self.schedule.total_steps

    def step_batches(self, epoch_iterator: Any, num_batches: int, device: Any, default: Callable) -> Any:
        """select and mix: the coming step's slots turned into this rank's micro-batches."""
        slots = []
        for _ in range(num_batches):
            try:
                slots.append(next(epoch_iterator))
            except StopIteration:
                break
        if not slots:
            return default(iter(()), 0, device)
        step = slots[0] // self.ga
        global_step = self.trainer.state.global_step
        if step != global_step:
            raise RuntimeError(f"DataFlex: slot for step {step} arrived at global step {global_step}")
        rows = self.round.rows(step)
        batches = [self.make_batch(rows, slot) for slot in slots]
        self.prepare_batches(batches)
        return default(iter(batches), len(batches), device)

    def make_batch(self, step_rows: list[int], slot: int) -> dict[str, Any]:
        micro = slot % self.ga
        ids = rank_micro_batch(step_rows, micro, self.rank, self.per_device, self.world)
        batch = self.collator([self.train[i] for i in ids])
        batch[INDEX_KEY] = torch.tensor(ids, dtype=torch.long)
        return batch

    def prepare_batches(self, batches: list[dict[str, Any]]) -> None:
        """A mode's additions to the step's batches before they are trained on (none by default)."""

    # ------------------------------------------------------------------ the loss
    def loss_hook(self) -> Callable | None:
        """What the mode does with this micro-batch's per-sample losses (None: it needs none)."""
        return None

    def loss_inputs(self, inputs: dict[str, Any]) -> dict[str, Any]:
        """The training forward's inputs, with anything extra the loss hook needs."""
        return inputs

    def compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool, num_items_in_batch: Any,
                     default: Callable[..., Any]) -> Any:
        ids = inputs.pop(INDEX_KEY, None)
        weights = inputs.pop(WEIGHT_KEY, None)
        domains = inputs.pop(DOMAIN_KEY, None)
        if ids is None:  # not a training batch of ours (evaluation)
            return default(model, inputs, return_outputs, num_items_in_batch)
        hook = self.loss_hook()
        if weights is not None and not bool((weights != 1).any()):
            weights = None  # all exactly 1: the correction is exactly 0, so skip the per-sample losses it needs
        if weights is None and hook is None:
            return default(model, inputs, return_outputs, num_items_in_batch)
        labels = inputs["labels"]
        if hook is not None:
            inputs = self.loss_inputs(inputs)
        loss, outputs = default(model, inputs, True, num_items_in_batch)
        logits = getattr(outputs, "logits", None)
        if logits is None:
            raise RuntimeError("the training forward returned no logits (a fused loss such as the liger kernel?); "
                               "per-sample weights need them")
        sums, counts = sample_loss_sums(logits, labels)
        if hook is not None:
            weights = hook(ids, domains, sums, counts, outputs, inputs, labels, logits, weights)
        if weights is not None:
            loss = loss + weight_correction(self.trainer, weights, sums, counts, num_items_in_batch)
        return (loss, outputs) if return_outputs else loss

    # ------------------------------------------------------------------ records and state
    def setup_digest(self) -> dict[str, Any]:
        """What a resumed run must share with the checkpoint's run (compared key by key)."""
        targs = self.trainer.args
        params = {k: v for k, v in self.component.params.to_dict().items() if k != "cache_dir"}
        digest = {
            "train_type": self.fa.train_type,
            "component": [self.spec.key, self.spec.name, fingerprint(params)],
            "global_batch": self.global_batch,
            "seed": targs.seed,
            "train_data": dataset_digest(self.train)["sha256"] if self.train is not None else None,
            "eval_data": fingerprint(dataset_digest(self.eval)),
        }
        if self.schedule is not None:
            s = self.schedule
            digest["schedule"] = [s.warmup_step, s.update_step, s.update_times, s.total_steps]
        return digest

    def state_dict(self) -> dict[str, Any]:
        """The checkpoint's ``dataflex_state.json`` (called on every rank)."""
        return {"run_id": self.log.run_id, "mode": self.name, "step": self.trainer.state.global_step,
                "setup": self.setup_digest(), "round": self.round_state()}

    def round_state(self) -> dict[str, Any]:
        return self.round.state_dict()

    def load_state_dict(self, round_state: dict[str, Any]) -> None:
        self.round.load_state_dict(round_state)

    def start(self, log: RunLog) -> None:
        """Training starts (or resumes) with these records."""
        self.log = log
        self.round.log = log

    def manifest(self) -> dict[str, Any]:
        """``run.json``: what the report and a reader need to know about the run."""
        t = self.trainer
        info = self.data
        manifest: dict[str, Any] = {
            "train_type": self.fa.train_type,
            "mode": self.name,
            "component": self.spec.key,
            "name": self.spec.name,
            "params": self.component.params.to_dict(),
            "train_size": len(self.train),
            "eval_size": len(self.eval) if self.eval is not None else None,
            "model": getattr(getattr(t.model, "config", None), "_name_or_path", None),
            "output_dir": os.path.abspath(t.args.output_dir),
            "seed": t.args.seed,
            "world_size": self.world,
            "global_batch": self.global_batch,
            "data_sources": {"dataset_dir": info.dataset_dir, "parts": info.parts} if info and info.parts else None,
            "setup": self.setup_digest(),
            # for the report's header: what produced the run, and where a resumed run picked up
            "versions": _versions(),
            "resumed_from": self.resumed_from,
            "resumed_at": self.resumed_at,
        }
        if self.schedule is not None:
            s = self.schedule
            manifest["schedule"] = {"warmup_step": s.warmup_step, "update_step": s.update_step,
                                    "update_times": s.update_times, "global_batch": s.global_batch,
                                    "total_steps": s.total_steps, "updates": [u.start_step for u in s.updates]}
        else:
            manifest["schedule"] = {"warmup_step": self.fa.warmup_step, "global_batch": self.global_batch}
        return manifest

    # ------------------------------------------------------------------ the end
    def finish_files(self) -> list[str]:
        """Files the mode writes when training ends (every rank calls it)."""
        return []

    def metrics(self) -> dict[str, Any]:
        """The mode's own entries in the training output's metrics."""
        return {}

    def finish(self, output: Any, total: float) -> Any:
        seconds = self.round.seconds
        share = seconds / total if total > 0 else 0.0
        files = self.finish_files()
        if self.rank == 0:
            logger.info("[DataFlex] %s took %.2fs of %.2fs training (%.1f%%)", self.round.what + "s", seconds, total,
                        100 * share)
            for path in files:
                logger.info("[DataFlex] wrote %s", path)
        output.metrics["dataflex_decisions"] = len(self.round.history) or getattr(self.round, "steps", 0)
        output.metrics["dataflex_seconds"] = round(seconds, 3)
        output.metrics["dataflex_share"] = round(share, 4)
        output.metrics.update(self.metrics())
        return output


def weight_correction(trainer: Any, weights: torch.Tensor, sums: torch.Tensor, counts: torch.Tensor,
                      num_items_in_batch: Any) -> torch.Tensor:
    """Σ_i (w_i − 1) S_i / D, scaled as the trainer scaled the model's own loss.

    The model's loss is Σ_i S_i / D (D: the step's supervised tokens over all micro-batches and
    ranks when the model takes ``num_items_in_batch``, else this micro-batch's), so the sum is
    the weighted loss Σ_i w_i S_i / D; with weights exactly 1 the correction is exactly 0.
    """
    w = weights.to(sums.device, torch.float32)
    accepts = bool(getattr(trainer, "model_accepts_loss_kwargs", False))
    if accepts and num_items_in_batch is not None:
        denominator = num_items_in_batch.to(sums.device) if torch.is_tensor(num_items_in_batch) else num_items_in_batch
    else:
        denominator = counts.sum().clamp(min=1).to(sums.device)
    correction = ((w - 1.0) * sums).sum() / denominator
    targs = trainer.args
    if (targs.average_tokens_across_devices and (accepts or trainer.compute_loss_func is not None)
            and num_items_in_batch is not None):
        correction = correction * (trainer.accelerator.num_processes if targs.n_gpu <= 1 else targs.n_gpu)
    return correction


def _versions() -> dict[str, str | None]:
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, str | None] = {}
    for pkg in ("dataflex", "llamafactory", "transformers", "torch"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out
