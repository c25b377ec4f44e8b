"""The trainer mixin: HF hooks forwarded to the run's mode, inside an unchanged HF training loop.

Nothing here depends on the mode. The trainer builds the run's mode once
(``self.dataflex_mode``, on a :class:`~dataflex.modes.base.ModeContext`); ``get_train_dataloader``,
``num_examples``, ``get_batch_samples`` and ``compute_loss`` ask it (:mod:`dataflex.modes`),
passing the parent trainer's own hook along; ``_save_checkpoint`` writes the mode's state as
``dataflex_state.json`` into the checkpoint, and ``train`` restores it on resume, starts the
run's records and lets the mode close the run. The mixin is combined with LLaMA-Factory's trainer
classes in :mod:`dataflex.integration`, which hands each trainer the run plan and what it learnt
about the data.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

from torch.utils.data import DataLoader

from .core.records import RunLog, new_run_id
from .core.state import check_setup, load_state, save_state
from .modes import run as mode_run
from .modes.base import ModeContext
from .modes.loss import compute_loss as mode_loss

logger = logging.getLogger("dataflex")


class DataFlexTrainerMixin:
    """Mixed in front of a HF ``Trainer`` subclass that has ``finetuning_args`` (LLaMA-Factory's)."""

    def __init__(self, *args: Any, dataflex_plan: Any = None, dataflex_data: Any = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.dataflex_mode = dataflex_plan.mode.mode_class()(ModeContext(self, dataflex_plan, dataflex_data))
        mode_run.describe(self.dataflex_mode)

    def df_prepare(self, dataset: Any, description: str) -> tuple[Any, Any]:
        """The dataset and collator the training dataloader would use (unused columns removed)."""
        import datasets

        collator = self.data_collator
        if isinstance(dataset, datasets.Dataset):
            dataset = self._remove_unused_columns(dataset, description=description)
        else:
            collator = self._get_collator_with_removed_columns(self.data_collator, description=description)
        return dataset, collator

    # ------------------------------------------------------------------ the HF loop
    def get_train_dataloader(self) -> DataLoader:
        return self.dataflex_mode.train_loader(super().get_train_dataloader)

    def num_examples(self, dataloader: DataLoader) -> int:
        return self.dataflex_mode.num_examples(dataloader, super().num_examples)

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        return self.dataflex_mode.step_batches(epoch_iterator, num_batches, device, super().get_batch_samples)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        parent = super().compute_loss

        def default(model, inputs, return_outputs, num_items_in_batch):
            return parent(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)

        return mode_loss(self.dataflex_mode, model, inputs, return_outputs, num_items_in_batch, default)

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        mode = getattr(self, "dataflex_mode", None)
        pending = mode.ctx.pending_logs if mode is not None else None
        if "loss" in logs and pending:  # the component's statistics join the training log
            logs = {**logs, **pending}
        super().log(logs, *args, **kwargs)

    # ------------------------------------------------------------------ checkpoints
    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

        folder = os.path.join(self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
        state = mode_run.state_dict(self.dataflex_mode)  # may be a collective: every rank builds it
        if self.args.should_save:
            save_state(folder, state)
        super()._save_checkpoint(model, trial)

    def _df_resume(self, checkpoint: str) -> str:
        """Restore the mode's round from ``checkpoint``; the run id to continue."""
        mode = self.dataflex_mode
        state = load_state(checkpoint)
        check_setup(state["setup"], mode_run.setup_digest(mode), checkpoint)
        mode.load_round_state(dict(state["round"]))
        mode.ctx.work.load(state.get("work"))  # the scoring work counts on from the checkpoint's
        if mode.ctx.rank == 0:
            logger.info("[DataFlex] resuming run %s at step %d from %s (%s state restored from the checkpoint)",
                        state["run_id"], state["step"], checkpoint, mode.ctx.info.singular)
        mode.ctx.resumed_at = int(state["step"])
        return str(state["run_id"])

    def train(self, resume_from_checkpoint: Any = None, *args: Any, **kwargs: Any):
        from transformers.trainer_utils import get_last_checkpoint

        mode = self.dataflex_mode
        ctx = mode.ctx
        checkpoint = resume_from_checkpoint
        if isinstance(checkpoint, bool):
            checkpoint = get_last_checkpoint(self.args.output_dir) if checkpoint else None
        ctx.resumed_at = None
        ctx.resumed_from = str(checkpoint) if checkpoint else None
        if checkpoint:
            run_id = self._df_resume(str(checkpoint))
            saved = set(os.listdir(checkpoint))
            if ctx.rank == 0 and not any(n.startswith(("optimizer", "scheduler", "global_step")) for n in saved):
                # the Trainer resumes such a checkpoint with a new optimizer and LR schedule, and says nothing
                logger.warning("[DataFlex] resume_from_checkpoint: %s has no optimizer or scheduler state (saved with "
                               "save_only_model: true): the data schedule resumes exactly, but the optimizer and the "
                               "learning-rate schedule start again", checkpoint)
        else:
            run_id = ctx.agreement.share("starting the run", new_run_id)
        log = RunLog(ctx.cache_dir, run_id, enabled=ctx.rank == 0)
        mode.round.log = log
        mode.start(log)
        log.write_manifest(self.args.output_dir, mode_run.manifest(mode))
        if ctx.rank == 0:
            logger.info("[DataFlex] run %s: records in %s", run_id, log.folder)
        start = time.perf_counter()
        output = super().train(resume_from_checkpoint, *args, **kwargs)
        total = time.perf_counter() - start
        output = mode_run.finish(mode, output, total)
        if ctx.rank == 0 and getattr(self.finetuning_args, "plot_loss", False):
            self._df_plot()
        return output

    def _df_plot(self) -> None:
        """The mode's PNG beside LLaMA-Factory's loss curve (``plot_loss: true``)."""
        from .report import plot_run

        try:
            for path in plot_run(self.args.output_dir):
                logger.info("[DataFlex] plot written to %s", path)
        except Exception as err:  # noqa: BLE001 - a plot must never fail a finished training
            logger.warning("[DataFlex] could not draw the DataFlex plot: %s", err)
