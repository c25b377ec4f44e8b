"""The trainer mixin: thin hooks into an unchanged HF training loop; the decisions are made by the rounds.

How it hooks in, without copying ``Trainer._inner_training_loop``:

* ``get_train_dataloader``: select and mix return a loader of *slots* - plain integers
  ``step * GA + micro`` - of length ``total_steps * GA``. Transformers counts steps, skips
  batches on resume and prefetches from it as usual; a slot carries no data, so prefetching
  cannot run ahead of a decision. Weight mode keeps LLaMA-Factory's own loader (its sampler,
  shuffling and epochs) and only adds each row's index to the batch.
* ``get_batch_samples`` (called once per optimizer step, after the previous optimizer step)
  turns the coming step's slots into batches: the round gives the step's rows (deciding first
  when a stretch starts, with the model exactly as it is after the last optimizer step) and each
  rank collates its share (:func:`dataflex.schedule.rank_micro_batch`). In weight mode it
  computes the step's weights over the global batch before the step's first backward.
* ``compute_loss`` adds the per-sample weights to the loss (weight mode; DoReMi's domain
  weights in mix mode) and reports what the forward saw to the mixer.
* ``_save_checkpoint`` writes ``dataflex_state.json`` into the checkpoint; ``train`` reads it
  back on resume, starts the run's records, and summarises at the end.

The mixin is combined with LLaMA-Factory's trainer classes in :mod:`dataflex.integration`.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from .component import KIND_OF_TRAIN_TYPE
from .components import build_component, get_component
from .core.agreement import Agreement
from .core.records import RunLog, fingerprint, new_run_id
from .core.rounds import LocalSignals, MixRound, MixSetup, SelectRound, WeightRound
from .core.sampling import DomainSampler
from .core.state import check_setup, load_state, save_state
from .errors import ConfigError
from .schedule import Schedule, Stretch, rank_micro_batch, total_steps
from .scoring.engine import ScoringEngine, dataset_lengths, eval_mode
from .scoring.losses import sample_loss_sums, supervised_logits, token_loss_sums
from .seeding import seeded_generator
from .mixers.base import starting_proportions
from .selectors.base import SelectionContext

logger = logging.getLogger("dataflex")

INDEX_KEY = "dataflex_index"  # training-set rows of a batch (select, mix, weight)
WEIGHT_KEY = "dataflex_weight"  # per-sample loss weights of a batch
DOMAIN_KEY = "dataflex_domain"  # domain of each row (mix)
DATAFLEX_KEYS = (INDEX_KEY, WEIGHT_KEY, DOMAIN_KEY)
MODES = {"dynamic_select": "select", "dynamic_mix": "mix", "dynamic_weight": "weight"}


def _first(batch: list) -> Any:
    return batch[0]


def _versions() -> dict[str, str | None]:
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, str | None] = {}
    for pkg in ("dataflex", "llamafactory", "transformers", "torch"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


class IndexedRows(Dataset):
    """The training set with each row's index added under ``INDEX_KEY`` (weight mode)."""

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


class DataFlexTrainerMixin:
    """Mixed in front of a HF ``Trainer`` subclass that has ``finetuning_args`` (LLaMA-Factory's)."""

    # ------------------------------------------------------------------ setup
    def __init__(self, *args: Any, dataflex_data: Any = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        fa, targs = self.finetuning_args, self.args
        self.df_mode = MODES[fa.train_type]
        self.df_data = dataflex_data
        self.df_rank, self.df_world = targs.process_index, targs.world_size
        self.df_agree = Agreement(self.df_rank, self.df_world)
        self.df_per_device = targs.per_device_train_batch_size
        self.df_ga = targs.gradient_accumulation_steps
        self.df_global_batch = self.df_per_device * self.df_ga * self.df_world
        self.df_spec = get_component(fa.components_cfg_file, fa.component_name, KIND_OF_TRAIN_TYPE[fa.train_type])
        self.df_component = build_component(self.df_spec, warn=self.df_rank == 0)
        self.df_train, self.df_collator = self._df_prepare(self.train_dataset, "training")
        self.df_eval = None
        if self.eval_dataset is not None:
            ev = self.eval_dataset
            if isinstance(ev, dict):  # several eval sets: the components score against all of them together
                from datasets import concatenate_datasets

                ev = concatenate_datasets(list(ev.values()))
            self.df_eval, _ = self._df_prepare(ev, "evaluation")
        self.df_component.check_data(len(self.df_train), len(self.df_eval) if self.df_eval is not None else None)
        self.df_scorer: ScoringEngine | None = None
        self.df_log: RunLog | None = None
        self.df_reference = None
        self.df_pending_logs: dict[str, float] = {}
        self.df_cache_dir = self.df_component.params.cache_dir or os.path.join(targs.output_dir, "dataflex")
        self.df_schedule: Schedule | None = None
        if self.df_mode == "select":
            self._df_setup_select()
        elif self.df_mode == "mix":
            self._df_setup_mix()
        else:
            self._df_setup_weight()
        if self.df_rank == 0:
            params = {k: v for k, v in self.df_component.params.to_dict().items() if v is not None}
            logger.info("[DataFlex] %s: component '%s' (%s '%s'), params %s", fa.train_type, self.df_spec.key,
                        self.df_component.kind[:-1], self.df_spec.name, params)
            if self.df_schedule is not None:
                logger.info("[DataFlex] schedule: %s", self.df_schedule.describe(self.df_round.what))
            stage = self.df_zero_stage()
            if stage is not None:
                logger.info("[DataFlex] DeepSpeed ZeRO-%d: %s", stage, "scoring runs on partitioned parameters"
                            if stage == 3 else "scoring runs on the full parameters each rank holds")

    def _df_prepare(self, dataset: Any, description: str) -> tuple[Any, Any]:
        """The dataset and collator the training dataloader would use (unused columns removed)."""
        import datasets

        collator = self.data_collator
        if isinstance(dataset, datasets.Dataset):
            dataset = self._remove_unused_columns(dataset, description=description)
        else:
            collator = self._get_collator_with_removed_columns(self.data_collator, description=description)
        return dataset, collator

    def _df_steps(self, cycles: bool, update_step: int, update_times: int) -> int:
        fa, targs = self.finetuning_args, self.args
        return total_steps(fa.warmup_step, update_step, update_times, self.df_global_batch,
                           num_train_epochs=targs.num_train_epochs, max_steps=targs.max_steps,
                           train_step=fa.train_step, rows=len(self.df_train), cycles=cycles)

    def _df_setup_select(self) -> None:
        fa = self.finetuning_args
        total = self._df_steps(True, fa.update_step, fa.update_times)
        self.df_schedule = Schedule.build(fa.warmup_step, fa.update_step, fa.update_times, self.df_global_batch, total)
        self.args.max_steps = total  # the LR schedule spans exactly the schedule
        self.df_round = SelectRound(self.df_schedule, self.df_component, self._df_selection_context, len(self.df_train),
                                    self.df_agree, RunLog(self.df_cache_dir, "-", enabled=False), self.args.seed,
                                    self.df_spec.key, log_fn=self.log)

    def _df_setup_mix(self) -> None:
        fa = self.finetuning_args
        mixer = self.df_component
        info = self.df_data
        if info is None or not info.parts or not info.exact:
            raise ConfigError("dataset: dynamic_mix could not tell which rows come from which dataset")
        domains = [p[0] for p in info.parts]
        sizes = [p[2] - p[1] for p in info.parts]
        rule = fa.mixture_sample_rule or "mixture"
        initial, how = starting_proportions(rule, sizes, fa.init_mixture_proportions, domains, mixer)
        if self.df_rank == 0:
            logger.info("[DataFlex] domains %s with %s rows; starting proportions %s: %s", domains, sizes,
                        [round(x, 4) for x in initial], how)
        if mixer.every_step:
            update_step, update_times = 1, -1
        else:
            update_step, update_times = fa.update_step or 0, fa.update_times if fa.update_times is not None else 0
        total = self._df_steps(False, update_step, update_times if not fa.static_mix else -1)
        self.df_schedule = Schedule.build(fa.warmup_step, update_step, 0 if fa.static_mix else update_times,
                                          self.df_global_batch, total, cycles=False)
        self.args.max_steps = total
        mixer.setup(domains, sizes, initial, total, fa.warmup_step)
        if fa.freeze_gate:
            self._df_freeze_routers()
        eval_sets = None
        if "router" in mixer.needs:
            eval_sets = [self._df_prepare(ds, "evaluation")[0] for ds in info.mixer_eval]
        setup = MixSetup(domains, sizes, initial, rule, bool(fa.static_mix), self.df_per_device, self.df_ga,
                         self.df_world, total, eval_sets)
        self.df_sampler = DomainSampler([tuple(p) for p in info.parts], self.args.seed)
        self.df_round = MixRound(self.df_schedule, mixer, self.df_sampler, setup, self._df_engine, self.df_agree,
                                 RunLog(self.df_cache_dir, "-", enabled=False), self.args.seed, self.df_spec.key,
                                 log_fn=self.log)
        if "excess" in mixer.needs:
            from .scoring.reference import ReferenceModel

            self.df_reference = ReferenceModel(mixer.params.reference_model_path, self.model, self.args.device)

    def _df_setup_weight(self) -> None:
        fa = self.finetuning_args
        if fa.train_step:
            self.args.max_steps = fa.train_step
        self.df_round = WeightRound(self.df_component, fa.warmup_step, self.df_agree,
                                    RunLog(self.df_cache_dir, "-", enabled=False), self.args.seed, self.df_spec.key)
        self.df_micro = 0

    def _df_freeze_routers(self) -> None:
        """``freeze_gate``: the mixture-of-experts routers stop training (nothing else does)."""
        from .scoring.reference import router_modules

        routers = router_modules(self.model)
        if not routers:
            raise ConfigError("freeze_gate: true, but the model has no mixture-of-experts router to freeze")
        frozen = 0
        for _, module in routers:
            for p in module.parameters():
                if p.requires_grad:
                    p.requires_grad_(False)
                    frozen += p.numel()
        if self.df_rank == 0:
            logger.info("[DataFlex] freeze_gate: %d router(s) frozen (%d parameters)", len(routers), frozen)

    def df_zero_stage(self) -> int | None:
        """The DeepSpeed ZeRO stage of this run, None without DeepSpeed."""
        if not getattr(self, "is_deepspeed_enabled", False):
            return None
        plugin = getattr(self.accelerator.state, "deepspeed_plugin", None)
        return int(plugin.zero_stage) if plugin is not None else None

    def _df_engine(self) -> ScoringEngine:
        if self.df_scorer is None:
            self.df_scorer = ScoringEngine(self.model, self.df_collator, self.args.device, agreement=self.df_agree)
        return self.df_scorer

    def _df_learning_rate(self) -> float:
        """η of the coming step: the rate of the parameter group holding the LoRA A matrices (or the first group)."""
        lr = self.args.learning_rate
        optimizer = getattr(self, "optimizer", None)
        groups = getattr(optimizer, "param_groups", None) if optimizer is not None else None
        if groups:
            lora_a = {id(p) for n, p in self.model.named_parameters() if "lora_A" in n}
            group = next((g for g in groups if any(id(p) in lora_a for p in g["params"])), groups[0])
            lr = float(group.get("lr", lr))
        return lr

    def _df_selection_context(self, stretch: Stretch, n: int) -> SelectionContext:
        return SelectionContext(
            step=stretch.start_step,
            selection=stretch.number,
            num_selections=self.df_schedule.num_updates,
            num_samples=n,
            train_dataset=self.df_train,
            scorer=self._df_engine(),
            generator=seeded_generator(self.args.seed, "select", stretch.number),
            records_dir=str(self.df_log.folder) if self.df_log is not None else self.df_cache_dir,
            eval_dataset=self.df_eval,
            optimizer=self.optimizer,
            learning_rate=self._df_learning_rate(),
            tokenizer=getattr(self, "processing_class", None),
        )

    # ------------------------------------------------------------------ identity and state
    def _df_setup_digest(self) -> dict[str, Any]:
        """What a resumed run must share with the checkpoint's run (compared key by key)."""
        fa = self.finetuning_args
        params = {k: v for k, v in self.df_component.params.to_dict().items() if k != "cache_dir"}
        digest = {
            "train_type": fa.train_type,
            "component": [self.df_spec.key, self.df_spec.name, fingerprint(params)],
            "global_batch": self.df_global_batch,
            "seed": self.args.seed,
            "train_data": dataset_digest(self.df_train)["sha256"] if self.df_train is not None else None,
            "eval_data": fingerprint(dataset_digest(self.df_eval)),
        }
        if self.df_schedule is not None:
            s = self.df_schedule
            digest["schedule"] = [s.warmup_step, s.update_step, s.update_times, s.total_steps]
        return digest

    def _df_state(self) -> dict[str, Any]:
        state: dict[str, Any] = {"run_id": self.df_log.run_id, "mode": self.df_mode, "step": self.state.global_step,
                                 "setup": self._df_setup_digest()}
        if self.df_mode == "mix":
            # statistics accumulate on every rank: the checkpoint keeps their sum (rank 0 resumes with it)
            total = self.df_agree.all_reduce("checkpoint: mixing statistics", self.df_round.stats.flat())
            from .mixers.base import DomainStats

            state["round"] = {**self.df_round.state_dict(), "stats": DomainStats.from_flat(total).to_dict()}
        else:
            state["round"] = self.df_round.state_dict()
        return state

    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

        folder = os.path.join(self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
        state = self._df_state()  # a collective in mix mode: every rank builds it
        if self.args.should_save:
            save_state(folder, state)
        super()._save_checkpoint(model, trial)

    def _df_resume(self, checkpoint: str) -> str:
        """Restore the round from ``checkpoint``; the run id to continue."""
        state = load_state(checkpoint)
        check_setup(state["setup"], self._df_setup_digest(), checkpoint)
        round_state = dict(state["round"])
        if self.df_mode == "mix" and self.df_rank != 0:
            from .mixers.base import DomainStats

            round_state["stats"] = DomainStats.zeros(len(self.df_round.setup.domains)).to_dict()
        self.df_round.load_state_dict(round_state)
        if self.df_rank == 0:
            logger.info("[DataFlex] resuming run %s at step %d from %s (%s state restored from the checkpoint)",
                        state["run_id"], state["step"], checkpoint, self.df_component.kind[:-1])
        self.df_resumed_at = int(state["step"])
        return str(state["run_id"])

    # ------------------------------------------------------------------ the HF loop
    def train(self, resume_from_checkpoint: Any = None, *args: Any, **kwargs: Any):
        from transformers.trainer_utils import get_last_checkpoint

        checkpoint = resume_from_checkpoint
        if isinstance(checkpoint, bool):
            checkpoint = get_last_checkpoint(self.args.output_dir) if checkpoint else None
        self.df_resumed_at = None
        self.df_resumed_from = str(checkpoint) if checkpoint else None
        if checkpoint:
            run_id = self._df_resume(str(checkpoint))
            saved = set(os.listdir(checkpoint))
            if self.df_rank == 0 and not any(n.startswith(("optimizer", "scheduler", "global_step")) for n in saved):
                # the Trainer resumes such a checkpoint with a new optimizer and LR schedule, and says nothing
                logger.warning("[DataFlex] resume_from_checkpoint: %s has no optimizer or scheduler state (saved with "
                               "save_only_model: true): the data schedule resumes exactly, but the optimizer and the "
                               "learning-rate schedule start again", checkpoint)
        else:
            run_id = self.df_agree.share("starting the run", new_run_id)
        self.df_log = RunLog(self.df_cache_dir, run_id, enabled=self.df_rank == 0)
        self.df_round.log = self.df_log
        if self.df_resumed_at is not None and self.df_mode == "weight":
            at = self.df_resumed_at
            self.df_log.truncate("weights.jsonl", lambda line: line.get("step", 0) < at)
        self._df_write_manifest()
        if self.df_rank == 0:
            logger.info("[DataFlex] run %s: records in %s", run_id, self.df_log.folder)
        start = time.perf_counter()
        output = super().train(resume_from_checkpoint, *args, **kwargs)
        total = time.perf_counter() - start
        return self._df_finish(output, total)

    def _df_finish(self, output: Any, total: float) -> Any:
        seconds = self.df_round.seconds
        share = seconds / total if total > 0 else 0.0
        files: list[str] = []
        if self.df_mode == "mix":
            files = self.df_round.finish(self.args.output_dir)
        if self.df_rank == 0:
            logger.info("[DataFlex] %s took %.2fs of %.2fs training (%.1f%%)", self.df_round.what + "s", seconds, total,
                        100 * share)
            for path in files:
                logger.info("[DataFlex] wrote %s", path)
            if getattr(self.finetuning_args, "plot_loss", False):
                from .report import plot_run

                try:
                    for path in plot_run(self.args.output_dir):
                        logger.info("[DataFlex] plot written to %s", path)
                except Exception as err:  # noqa: BLE001 - a plot must never fail a finished training
                    logger.warning("[DataFlex] could not draw the DataFlex plot: %s", err)
        output.metrics["dataflex_decisions"] = len(self.df_round.history) or getattr(self.df_round, "steps", 0)
        output.metrics["dataflex_seconds"] = round(seconds, 3)
        output.metrics["dataflex_share"] = round(share, 4)
        if self.df_mode == "select":
            output.metrics["dataflex_selections"] = len(self.df_round.history)
        return output

    def _df_write_manifest(self) -> None:
        info = self.df_data
        manifest: dict[str, Any] = {
            "train_type": self.finetuning_args.train_type,
            "mode": self.df_mode,
            "component": self.df_spec.key,
            "name": self.df_spec.name,
            "params": self.df_component.params.to_dict(),
            "train_size": len(self.df_train),
            "eval_size": len(self.df_eval) if self.df_eval is not None else None,
            "model": getattr(getattr(self.model, "config", None), "_name_or_path", None),
            "output_dir": os.path.abspath(self.args.output_dir),
            "seed": self.args.seed,
            "world_size": self.df_world,
            "global_batch": self.df_global_batch,
            "data_sources": {"dataset_dir": info.dataset_dir, "parts": info.parts} if info and info.parts else None,
            "setup": self._df_setup_digest(),
            # for the report's header: what produced the run, and where a resumed run picked up
            "versions": _versions(),
            "resumed_from": getattr(self, "df_resumed_from", None),
            "resumed_at": getattr(self, "df_resumed_at", None),
        }
        if self.df_schedule is not None:
            s = self.df_schedule
            manifest["schedule"] = {"warmup_step": s.warmup_step, "update_step": s.update_step,
                                    "update_times": s.update_times, "global_batch": s.global_batch,
                                    "total_steps": s.total_steps, "updates": [u.start_step for u in s.updates]}
        else:
            manifest["schedule"] = {"warmup_step": self.finetuning_args.warmup_step, "global_batch": self.df_global_batch}
        self.df_log.write_manifest(self.args.output_dir, manifest)

    def get_train_dataloader(self) -> DataLoader:
        if self.df_mode == "weight":
            dataset, collator = self.train_dataset, self.data_collator
            self.train_dataset, self.data_collator = IndexedRows(dataset), IndexCollator(collator)
            try:
                return super().get_train_dataloader()
            finally:
                self.train_dataset, self.data_collator = dataset, collator
        slots = range(self.df_schedule.total_steps * self.df_ga)
        return DataLoader(slots, batch_size=1, shuffle=False, collate_fn=_first)

    def num_examples(self, dataloader: DataLoader) -> int:
        if self.df_mode == "weight":
            return super().num_examples(dataloader)
        return self.df_schedule.total_steps * self.df_global_batch

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        if self.df_mode == "weight":
            batches, num_items = super().get_batch_samples(epoch_iterator, num_batches, device)
            self.df_micro = 0
            if batches and self.df_round.active(self.state.global_step) and \
                    self.df_component.params.scope == "global_batch":
                self._df_weigh_step(batches)
            return batches, num_items
        slots = []
        for _ in range(num_batches):
            try:
                slots.append(next(epoch_iterator))
            except StopIteration:
                break
        if not slots:
            return super().get_batch_samples(iter(()), 0, device)
        step = slots[0] // self.df_ga
        if step != self.state.global_step:
            raise RuntimeError(f"DataFlex: slot for step {step} arrived at global step {self.state.global_step}")
        rows = self.df_round.rows(step)
        batches = [self._df_make_batch(rows, slot) for slot in slots]
        if self.df_mode == "mix" and self.df_round.loss_weights is not None:
            self._df_domain_loss_weights(batches)
        return super().get_batch_samples(iter(batches), len(batches), device)

    def _df_make_batch(self, step_rows: list[int], slot: int) -> dict[str, Any]:
        micro = slot % self.df_ga
        ids = rank_micro_batch(step_rows, micro, self.df_rank, self.df_per_device, self.df_world)
        batch = self.df_collator([self.df_train[i] for i in ids])
        batch[INDEX_KEY] = torch.tensor(ids, dtype=torch.long)
        if self.df_mode == "mix":
            batch[DOMAIN_KEY] = torch.tensor([self.df_sampler.domain_of(i) for i in ids], dtype=torch.long)
        return batch

    def _df_domain_loss_weights(self, batches: list[dict[str, Any]]) -> None:
        """DoReMi: per-sample weights of the α-weighted domain loss for this step's batches."""
        k = len(self.df_round.setup.domains)
        local = torch.zeros(k, dtype=torch.float64)
        for b in batches:
            tokens = (b["labels"][:, 1:] != -100).sum(dim=1).double()
            local.index_add_(0, b[DOMAIN_KEY], tokens)
        total = self.df_agree.all_reduce(f"step {self.state.global_step}: tokens per domain", local)
        for b in batches:
            b[WEIGHT_KEY] = self.df_round.sample_loss_weights(b[DOMAIN_KEY], total)

    def _df_weigh_step(self, batches: list[dict[str, Any]]) -> None:
        """Weight mode, global-batch scope: signals of this rank's micro-batches -> the step's weights."""
        needs = self.df_component.needs
        step = self.state.global_step
        from .weighters.base import WeightContext

        self.df_agree.run(f"weights of step {step}: preparing",
                          lambda: self.df_component.prepare(WeightContext(step, self._df_engine(), self.df_eval)))
        local: list[LocalSignals] = []
        with self.df_agree.section(f"weights of step {step}: scoring the step's samples"):
            for b in batches:
                local.append(self._df_signals(b, needs))
        weights = self.df_round.decide(step, local)
        for b, w in zip(batches, weights):
            b[WEIGHT_KEY] = w
        self.df_pending_logs = dict(self.df_round.last_logs)

    def _df_signals(self, batch: dict[str, Any], needs: frozenset[str]) -> LocalSignals:
        labels = batch["labels"]
        tokens = (labels[:, 1:] != -100).sum(dim=1)
        ids = batch[INDEX_KEY].tolist()
        if not needs:
            return LocalSignals(ids, tokens)
        model = self.model
        device = self.args.device
        inputs = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()
                  if k not in DATAFLEX_KEYS and k != "labels"}
        inputs["use_cache"] = False
        labels = labels.to(device)
        losses = embeddings = None
        with eval_mode(model), torch.no_grad():
            if "embeddings" in needs:
                from .scoring.embeddings import pool_states

                comp = self.df_component
                out = model(**inputs, output_hidden_states=True)
                embeddings = pool_states(out.hidden_states, inputs.get("attention_mask"), comp.embedding_layer,
                                         comp.embedding_pooling).cpu()
                if "losses" in needs:
                    sums, counts = sample_loss_sums(out.logits, labels)
                    losses = (sums.double() / counts.clamp(min=1)).masked_fill(counts == 0, float("nan")).cpu()
            elif "losses" in needs:
                sums, counts = token_loss_sums(*supervised_logits(model, inputs, labels))
                losses = (sums.double() / counts.clamp(min=1)).masked_fill(counts == 0, float("nan")).cpu()
        return LocalSignals(ids, tokens, losses, embeddings)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        ids = inputs.pop(INDEX_KEY, None)
        weights = inputs.pop(WEIGHT_KEY, None)
        domains = inputs.pop(DOMAIN_KEY, None)
        if ids is None:  # not a training batch of ours (evaluation)
            return super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        micro_scope = (self.df_mode == "weight" and self.df_component.params.scope == "micro_batch"
                       and self.df_round.active(self.state.global_step))
        observe = self.df_mode == "mix" and bool(self.df_component.needs & {"losses", "excess"})
        if weights is not None and not bool((weights != 1).any()):
            weights = None  # all exactly 1: the correction is exactly 0, so skip the per-sample losses it needs
        if weights is None and not micro_scope and not observe:
            return super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        labels = inputs["labels"]
        if micro_scope and "embeddings" in self.df_component.needs:
            inputs = {**inputs, "output_hidden_states": True}
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        logits = getattr(outputs, "logits", None)
        if logits is None:
            raise RuntimeError("the training forward returned no logits (a fused loss such as the liger kernel?); "
                               "per-sample weights need them")
        sums, counts = sample_loss_sums(logits, labels)
        if micro_scope:
            weights = self._df_weigh_micro(ids, counts, sums, outputs, inputs)
        if weights is not None:
            loss = loss + self._df_weight_correction(weights, sums, counts, num_items_in_batch)
        if observe:
            excess = None
            if self.df_reference is not None:
                excess = self.df_reference.excess_sums(inputs, labels, logits.detach())
            self.df_round.observe(domains, sums.detach(), counts, excess)
        return (loss, outputs) if return_outputs else loss

    def _df_weigh_micro(self, ids, counts, sums, outputs, inputs) -> torch.Tensor:
        """Weight mode, micro-batch scope: weights over this micro-batch on every rank, from its training forward."""
        from .weighters.base import WeightContext

        step, micro = self.state.global_step, self.df_micro
        self.df_micro += 1
        needs = self.df_component.needs
        self.df_agree.run(f"weights of step {step}: preparing",
                          lambda: self.df_component.prepare(WeightContext(step, self._df_engine(), self.df_eval)))
        losses = embeddings = None
        if "losses" in needs:
            losses = (sums.detach().double() / counts.clamp(min=1)).masked_fill(counts == 0, float("nan")).cpu()
        if "embeddings" in needs:
            from .scoring.embeddings import pool_states

            comp = self.df_component
            embeddings = pool_states([h.detach() for h in outputs.hidden_states], inputs.get("attention_mask"),
                                     comp.embedding_layer, comp.embedding_pooling).cpu()
        local = LocalSignals(ids.tolist(), counts.cpu(), losses, embeddings)
        (w,) = self.df_round.decide(step, [local], micro=micro)
        self.df_pending_logs = dict(self.df_round.last_logs)
        return w

    def _df_weight_correction(self, weights: torch.Tensor, sums: torch.Tensor, counts: torch.Tensor,
                              num_items_in_batch: Any) -> torch.Tensor:
        """Σ_i (w_i − 1) S_i / D, scaled as the trainer scaled the model's own loss.

        The model's loss is Σ_i S_i / D (D: the step's supervised tokens over all micro-batches and
        ranks when the model takes ``num_items_in_batch``, else this micro-batch's), so the sum is
        the weighted loss Σ_i w_i S_i / D; with weights exactly 1 the correction is exactly 0 and the
        run is bit for bit plain training.
        """
        w = weights.to(sums.device, torch.float32)
        accepts = bool(getattr(self, "model_accepts_loss_kwargs", False))
        if accepts and num_items_in_batch is not None:
            denominator = num_items_in_batch.to(sums.device) if torch.is_tensor(num_items_in_batch) else num_items_in_batch
        else:
            denominator = counts.sum().clamp(min=1).to(sums.device)
        correction = ((w - 1.0) * sums).sum() / denominator
        if (self.args.average_tokens_across_devices and (accepts or self.compute_loss_func is not None)
                and num_items_in_batch is not None):
            correction = correction * (self.accelerator.num_processes if self.args.n_gpu <= 1 else self.args.n_gpu)
        return correction

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        if "loss" in logs and self.df_pending_logs:  # the weighter's statistics join the training log
            logs = {**logs, **self.df_pending_logs}
        super().log(logs, *args, **kwargs)
