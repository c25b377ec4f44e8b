"""The dynamic-selection trainer: feeds the schedule's samples to an unchanged HF training loop.

How it hooks in, without copying ``Trainer._inner_training_loop``:

* ``get_train_dataloader`` returns a loader of *slots* - plain integers ``step * GA + micro`` - of
  length ``total_steps * GA``. Transformers counts steps, skips batches on resume and prefetches
  from it as usual; a slot carries no data, so prefetching cannot run ahead of a selection.
* ``get_batch_samples`` (called once per optimizer step, after the previous optimizer step) turns
  the slots of the coming step into real batches. When the step starts a selection stretch, the
  selector runs first - with the model exactly as it is after the last optimizer step. All ranks
  take part; rank 0's decision is broadcast; each rank then collates its share of the step's
  indices (:func:`dataflex.schedule.rank_micro_batch`).
* ``training_step`` strips the sample ids that travel with each batch (and traces them when
  ``DATAFLEX_TRACE_DIR`` is set, for tests and debugging).

The mixin is combined with LLaMA-Factory's trainer class in :mod:`dataflex.integration`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
import traceback
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from .components import build_selector, get_component
from .errors import SelectionError
from .records import atomic_write_json, fingerprint, load_record, write_record
from .schedule import Schedule, Stretch, rank_micro_batch
from .seeding import seeded_generator
from .scoring.distributed import all_gather_object, broadcast_object
from .scoring.engine import ScoringEngine, dataset_lengths
from .selectors.base import SelectionContext, SelectionResult, uniform_draw

logger = logging.getLogger("dataflex")

INDEX_KEY = "dataflex_index"
TRACE_ENV = "DATAFLEX_TRACE_DIR"
FAULT_ENV = "DATAFLEX_TEST_FAIL_SELECTION"  # test-only: "rank:selection" makes that selection raise
PAUSE_ENV = "DATAFLEX_TEST_PAUSE_AT_STEP"  # test-only: block at this step (after touching PAUSE_FILE_ENV)
PAUSE_FILE_ENV = "DATAFLEX_TEST_PAUSE_FILE"


def _first(batch: list) -> Any:
    return batch[0]


def dataset_digest(dataset: Any) -> dict[str, Any]:
    """Identify a tokenized dataset cheaply: its size, all row lengths, and a sample of rows."""
    if dataset is None:
        return {}
    if isinstance(dataset, dict):  # several eval sets
        return {k: dataset_digest(v) for k, v in sorted(dataset.items())}
    n = len(dataset)
    h = hashlib.sha256()
    h.update(json.dumps(dataset_lengths(dataset)).encode())
    for i in sorted({(j * max(n - 1, 0)) // 63 for j in range(64)} if n else set()):
        row = dataset[i]
        h.update(json.dumps([row.get("input_ids"), row.get("labels")]).encode())
    return {"size": n, "sha256": h.hexdigest()[:16]}


def selection_log(seconds: float, unique: int, metric: dict[str, Any]) -> dict[str, float]:
    """Scalars logged through the trainer (so tensorboard / wandb show them) after a selection."""
    logs = {"dataflex/selection_seconds": round(seconds, 4), "dataflex/unique_samples": unique}
    for key, values in metric.items():
        if isinstance(values, list) and values and all(isinstance(v, float) for v in values):
            t = torch.tensor(values, dtype=torch.float64)
            logs[f"dataflex/{key}_mean"] = round(float(t.mean()), 6)
            logs[f"dataflex/{key}_min"] = round(float(t.min()), 6)
            logs[f"dataflex/{key}_max"] = round(float(t.max()), 6)
    return logs


class DynamicSelectMixin:
    """Mixed in front of a HF ``Trainer`` subclass that has ``finetuning_args`` (LLaMA-Factory's)."""

    # ------------------------------------------------------------------ setup
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        fa, targs = self.finetuning_args, self.args
        self.df_spec = get_component(fa.components_cfg_file, fa.component_name)
        self.df_selector = build_selector(self.df_spec)
        self.df_world = targs.world_size
        self.df_rank = targs.process_index
        self.df_per_device = targs.per_device_train_batch_size
        self.df_ga = targs.gradient_accumulation_steps
        global_batch = self.df_per_device * self.df_ga * self.df_world
        self.df_schedule = Schedule.build(
            fa.warmup_step, fa.update_step, fa.update_times, global_batch, targs.num_train_epochs, targs.max_steps
        )
        targs.max_steps = self.df_schedule.total_steps  # the LR schedule spans exactly the schedule
        self.df_cache_dir = self.df_selector.params.cache_dir or os.path.join(targs.output_dir, "dataflex")

        self.df_train, self.df_collator = self._df_prepare(self.train_dataset, "training")
        self.df_eval = None
        if self.eval_dataset is not None:
            ev = self.eval_dataset
            if isinstance(ev, dict):  # several eval sets: selectors score against all of them together
                from datasets import concatenate_datasets

                ev = concatenate_datasets(list(ev.values()))
            self.df_eval, _ = self._df_prepare(ev, "evaluation")

        self.df_fingerprint = fingerprint(self._df_fingerprint_payload())
        self.df_stretch: Stretch | None = None
        self.df_indices: list[int] = []
        self.df_resuming: bool | None = None
        self.df_selection_seconds = 0.0
        self.df_scorer: ScoringEngine | None = None
        self.df_history: list[dict[str, Any]] = []
        trace_dir = os.environ.get(TRACE_ENV)
        self.df_trace = Path(trace_dir) / f"trace_rank{self.df_rank}.jsonl" if trace_dir else None
        if self.df_rank == 0:
            self._df_write_manifest()
            logger.info(
                "[DataFlex] component '%s' (selector '%s'), params %s", self.df_spec.key, self.df_spec.selector,
                {k: v for k, v in self.df_selector.params.to_dict().items() if v is not None},
            )
            logger.info("[DataFlex] schedule: %s", self.df_schedule.describe())
            logger.info("[DataFlex] selection records: %s (run fingerprint %s)", self.df_cache_dir, self.df_fingerprint)
            stage = self.df_zero_stage()
            if stage is not None:
                logger.info("[DataFlex] DeepSpeed ZeRO-%d: %s", stage, "scoring runs on partitioned parameters"
                            if stage == 3 else "scoring runs on the full parameters each rank holds")

    def df_zero_stage(self) -> int | None:
        """The DeepSpeed ZeRO stage of this run, None without DeepSpeed."""
        if not getattr(self, "is_deepspeed_enabled", False):
            return None
        plugin = getattr(self.accelerator.state, "deepspeed_plugin", None)
        return int(plugin.zero_stage) if plugin is not None else None

    def df_data_sources(self) -> dict[str, Any] | None:
        """Which rows of the train set come from which dataset (set by the integration layer)."""
        return None

    def _df_write_manifest(self) -> None:
        """``{output_dir}/dataflex/run.json``: what `dataflex-cli report` needs to describe this run."""
        sched = self.df_schedule
        from .report import manifest_path

        atomic_write_json(manifest_path(self.args.output_dir), {
            "fingerprint": self.df_fingerprint,
            "cache_dir": os.path.abspath(self.df_cache_dir),
            "component": self.df_spec.key,
            "selector": self.df_spec.selector,
            "params": self.df_selector.params.to_dict(),
            "schedule": {"warmup_step": sched.warmup_step, "update_step": sched.update_step,
                         "update_times": sched.update_times, "global_batch": sched.global_batch,
                         "total_steps": sched.total_steps, "selections": [s.start_step for s in sched.selections]},
            "train_size": len(self.df_train),
            "eval_size": len(self.df_eval) if self.df_eval is not None else None,
            "model": getattr(getattr(self.model, "config", None), "_name_or_path", None),
            "output_dir": os.path.abspath(self.args.output_dir),
            "seed": self.args.seed,
            "world_size": self.df_world,
            "data_sources": self.df_data_sources(),
        })

    def _df_prepare(self, dataset: Any, description: str) -> tuple[Any, Any]:
        """The dataset and collator the training dataloader would use (unused columns removed)."""
        import datasets

        collator = self.data_collator
        if isinstance(dataset, datasets.Dataset):
            dataset = self._remove_unused_columns(dataset, description=description)
        else:
            collator = self._get_collator_with_removed_columns(self.data_collator, description=description)
        return dataset, collator

    def _df_fingerprint_payload(self) -> dict[str, Any]:
        model = self.model
        config = getattr(model, "config", None)
        params = {k: v for k, v in self.df_selector.params.to_dict().items() if k != "cache_dir"}
        fa = self.finetuning_args
        return {
            "model": getattr(config, "_name_or_path", None),
            "finetuning": [fa.finetuning_type, getattr(fa, "lora_rank", None), getattr(fa, "lora_target", None)],
            "train": dataset_digest(self.df_train),
            "eval": dataset_digest(self.df_eval),
            "component": [self.df_spec.key, self.df_spec.selector, params],
            "seed": self.args.seed,
            "global_batch": self.df_schedule.global_batch,
            "schedule": [self.df_schedule.warmup_step, self.df_schedule.update_step, self.df_schedule.update_times,
                         self.df_schedule.total_steps],
        }

    # ------------------------------------------------------------------ hooks into the HF loop
    def get_train_dataloader(self) -> DataLoader:
        slots = range(self.df_schedule.total_steps * self.df_ga)
        return DataLoader(slots, batch_size=1, shuffle=False, collate_fn=_first)

    def num_examples(self, dataloader: DataLoader) -> int:
        return self.df_schedule.total_steps * self.df_schedule.global_batch

    def get_batch_samples(self, epoch_iterator, num_batches, device):
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
        if self.df_resuming is None:
            self.df_resuming = self.state.global_step > 0
            if self.df_resuming:
                self._df_restore_selector_state(step)
        self._df_test_pause(step)
        self._df_ensure_stretch(step)
        batches = [self._df_make_batch(slot) for slot in slots]
        return super().get_batch_samples(iter(batches), len(batches), device)

    def training_step(self, model, inputs, *args: Any, **kwargs: Any):
        ids = inputs.pop(INDEX_KEY, None)
        if self.df_trace is not None and ids is not None:
            self.df_trace.parent.mkdir(parents=True, exist_ok=True)
            with self.df_trace.open("a", encoding="utf-8") as fh:
                fh.write(json.dumps({"step": self.state.global_step, "indices": ids.tolist()}) + "\n")
        return super().training_step(model, inputs, *args, **kwargs)

    def train(self, *args: Any, **kwargs: Any):
        start = time.perf_counter()
        output = super().train(*args, **kwargs)
        total = time.perf_counter() - start
        share = self.df_selection_seconds / total if total > 0 else 0.0
        if self.df_rank == 0:
            logger.info(
                "[DataFlex] %d selection(s) took %.2fs of %.2fs training (%.1f%%)",
                len(self.df_history), self.df_selection_seconds, total, 100 * share,
            )
        if self.df_rank == 0 and getattr(self.finetuning_args, "plot_loss", False) and self.df_history:
            from .report import plot_selections

            try:
                path = plot_selections(self.df_cache_dir, self.args.output_dir)
                logger.info("[DataFlex] selection plot written to %s", path)
            except Exception as err:  # noqa: BLE001 - a plot must never fail a finished training
                logger.warning("[DataFlex] could not draw the selection plot: %s", err)
        output.metrics["dataflex_selections"] = len(self.df_history)
        output.metrics["dataflex_selection_seconds"] = round(self.df_selection_seconds, 3)
        output.metrics["dataflex_selection_share"] = round(share, 4)
        return output

    # ------------------------------------------------------------------ resume
    def _df_restore_selector_state(self, step: int) -> None:
        """Bring the selector's state (e.g. delta_loss's baseline) back to what it was at ``step``.

        The state travels inside every selection record, so the record of the last selection
        before ``step`` holds it.
        """
        earlier = [s for s in self.df_schedule.selections if s.start_step < step]
        if not earlier:
            return
        last = earlier[-1]
        record = self._df_load_record(last.start_step)
        if record is None:
            if self.df_rank == 0:
                logger.warning("[DataFlex] resuming at step %d without the record of selection %d (step_%d.json): "
                               "the selector starts without its earlier state", step, last.selection + 1,
                               last.start_step)
            return
        if record.get("selector_state"):
            self.df_selector.load_state_dict(record["selector_state"])
        if self.df_rank == 0:
            logger.info("[DataFlex] resuming at step %d: selector state restored from step_%d.json", step,
                        last.start_step)

    def _df_load_record(self, step: int) -> dict[str, Any] | None:
        """Rank 0 reads the record (it wrote it) and every rank gets rank 0's answer, so all ranks
        agree on reusing it even when the other nodes cannot see rank 0's files."""
        record = load_record(self.df_cache_dir, step, self.df_fingerprint) if self.df_rank == 0 else None
        return broadcast_object(record, src=0)

    def _df_test_pause(self, step: int) -> None:
        if os.environ.get(PAUSE_ENV) == str(step):
            marker = os.environ.get(PAUSE_FILE_ENV)
            if marker and self.df_rank == 0:
                Path(marker).write_text(str(os.getpid()))
            while True:  # a test kills the process here (SIGKILL)
                time.sleep(1)

    # ------------------------------------------------------------------ the schedule
    def _df_make_batch(self, slot: int) -> dict[str, Any]:
        step, micro = divmod(slot, self.df_ga)
        offset = (step - self.df_stretch.start_step) * self.df_schedule.global_batch
        step_indices = self.df_indices[offset : offset + self.df_schedule.global_batch]
        ids = rank_micro_batch(step_indices, micro, self.df_rank, self.df_per_device, self.df_world)
        batch = self.df_collator([self.df_train[i] for i in ids])
        batch[INDEX_KEY] = torch.tensor(ids, dtype=torch.long)
        return batch

    def _df_ensure_stretch(self, step: int) -> None:
        stretch = self.df_schedule.stretch_at(step)
        if self.df_stretch == stretch:
            return
        if stretch.is_selection:
            self.df_indices = self._df_select(stretch)
        else:
            gen = seeded_generator(self.args.seed, "warmup", stretch.cycle)
            n = self.df_schedule.samples_for(stretch)
            self.df_indices, _ = uniform_draw(len(self.df_train), n, gen)
            if self.df_rank == 0:
                logger.info("[DataFlex] warm-up cycle %d: %d random samples for steps %d-%d",
                            stretch.cycle, n, stretch.start_step, stretch.end_step - 1)
        self.df_stretch = stretch

    def _df_select(self, stretch: Stretch) -> list[int]:
        step, n = stretch.start_step, self.df_schedule.samples_for(stretch)
        if self.df_resuming:
            record = self._df_load_record(step)
            if record is not None and len(record["indices"]) == n:
                if record.get("selector_state"):
                    self.df_selector.load_state_dict(record["selector_state"])
                if self.df_rank == 0:
                    logger.info("[DataFlex] selection %d at step %d: reusing %s", stretch.selection + 1, step,
                                f"step_{step}.json")
                return list(record["indices"])

        start = time.perf_counter()
        ctx = self._df_context(stretch, n)
        result, error = None, None
        try:
            fault = os.environ.get(FAULT_ENV)
            if fault and fault == f"{self.df_rank}:{stretch.selection}":
                raise RuntimeError(f"injected test fault on rank {self.df_rank}")
            result = self.df_selector.select(ctx)
            self._df_check_result(result, n)
        except SelectionError as err:  # already gathered from every rank by the scoring engine
            error = str(err)
        except Exception as err:  # noqa: BLE001 - reported to every rank below, then re-raised
            error = f"failed on rank {self.df_rank}: {type(err).__name__}: {err}"
            logger.error("[DataFlex] selection failed on rank %d:\n%s", self.df_rank, traceback.format_exc())
        errors = [e for e in all_gather_object(error) if e]
        if errors:
            raise SelectionError(
                f"selection {stretch.selection + 1} at step {step} (selector '{self.df_spec.selector}') {errors[0]}"
            )
        payload = broadcast_object((result.indices, result.metric) if self.df_rank == 0 else None, src=0)
        indices, metric = self._df_shuffle(payload[0], payload[1], stretch)
        seconds = time.perf_counter() - start
        self.df_selection_seconds += seconds
        record = {
            "indices": indices,
            "metric": metric,
            "selector": self.df_spec.selector,
            "component": self.df_spec.key,
            "selection": stretch.selection,
            "cycle_selection": stretch.t,
            "step": step,
            "num_steps": stretch.num_steps,
            "fingerprint": self.df_fingerprint,
            "seconds": round(seconds, 4),
        }
        state = self.df_selector.state_dict()
        if state:  # e.g. delta_loss's baseline: restored with the record on resume
            record["selector_state"] = state
        if self.df_rank == 0:
            write_record(self.df_cache_dir, step, record)
        unique = len(set(indices))
        self.df_history.append({"step": step, "seconds": seconds, "unique": unique})
        if self.df_rank == 0:
            logger.info(
                "[DataFlex] selection %d/%d at step %d by '%s': %d samples (%d unique) in %.2fs -> step_%d.json",
                stretch.selection + 1, self.df_schedule.num_selections, step, self.df_spec.selector, len(indices),
                unique, seconds, step,
            )
        self.log(selection_log(seconds, unique, metric))
        return indices

    def _df_context(self, stretch: Stretch, n: int) -> SelectionContext:
        lr = self.args.learning_rate
        if getattr(self, "lr_scheduler", None) is not None:
            try:
                lr = float(self.lr_scheduler.get_last_lr()[0])
            except Exception:  # noqa: BLE001 - schedulers without get_last_lr
                pass
        return SelectionContext(
            step=stretch.start_step,
            selection=stretch.selection,
            t=stretch.t,
            T=self.df_schedule.update_times,
            num_selections=self.df_schedule.num_selections,
            num_samples=n,
            train_size=len(self.df_train),
            generator=seeded_generator(self.args.seed, "select", stretch.selection),
            seed=self.args.seed,
            cache_dir=self.df_cache_dir,
            rank=self.df_rank,
            world_size=self.df_world,
            model=self.model,
            train_dataset=self.df_train,
            eval_dataset=self.df_eval,
            collator=self.df_collator,
            optimizer=self.optimizer,
            learning_rate=lr,
            device=self.args.device,
            scorer=self._df_get_scorer(),
        )

    def _df_get_scorer(self) -> ScoringEngine:
        if self.df_scorer is None:
            self.df_scorer = ScoringEngine(
                self.model, self.df_collator, self.args.device, rank=self.df_rank, world_size=self.df_world
            )
        return self.df_scorer

    def _df_check_result(self, result: SelectionResult, n: int) -> None:
        if len(result.indices) != n:
            raise RuntimeError(f"selector returned {len(result.indices)} indices, expected {n}")
        size = len(self.df_train)
        bad = [i for i in result.indices if not (isinstance(i, int) and 0 <= i < size)]
        if bad:
            raise RuntimeError(f"selector returned index {bad[0]!r} outside the training set [0, {size})")

    def _df_shuffle(self, indices: list[int], metric: dict[str, Any], stretch: Stretch) -> tuple[list[int], dict]:
        """Consumption order: a seeded permutation, applied to the per-sample metrics too."""
        perm = torch.randperm(len(indices), generator=seeded_generator(self.args.seed, "order", stretch.selection))
        perm = perm.tolist()
        out = {}
        for key, value in metric.items():
            if isinstance(value, list) and len(value) == len(indices):
                out[key] = [value[p] for p in perm]
            else:
                out[key] = value
        return [indices[p] for p in perm], out
