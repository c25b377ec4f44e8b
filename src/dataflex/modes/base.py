"""The mode interface: the trainer facts a mode reads, and the protocol a mode implements.

A mode is built once per trainer from the run plan. It gets a :class:`ModeContext` - the facts of
the trainer it runs in (rank, world size, global batch, the prepared datasets, the scoring
engine, the ZeRO stage), built once - and implements the small :class:`Mode` protocol: the
training loader and the step's batches, what it does with the loss, its round's state, and a few
facts for the records. Nothing is inherited but the class-level checks' defaults
(:class:`ModeChecks`). What modes share is composed, not inherited:

* :class:`~dataflex.modes.rows.ScheduledRows` - a loader of slots whose rows the mode's round
  decides per step (select, mix, reorder);
* :mod:`dataflex.modes.loss` - the training loss with per-sample weights, and
  :class:`~dataflex.modes.loss.LossSignals`, what a mode's loss hook is handed;
* :mod:`dataflex.modes.run` - what every run writes and says (the manifest, the checkpoint state,
  the log lines, the end of training), from the context and the mode's answers.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, ClassVar, Protocol

from ..dist.agreement import Agreement
from ..schedule import total_steps
from ..scoring.engine import DecisionWork, ScoringEngine, dataset_lengths

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


class ModeContext:
    """The trainer facts every mode reads, built once per trainer (before the mode).

    The training and evaluation sets are prepared as the training loader would see them (unused
    columns removed); several evaluation sets are concatenated, ``eval_groups`` telling them apart.
    """

    def __init__(self, trainer: Any, plan: Any, data: Any):
        targs = trainer.args
        self.trainer = trainer
        self.plan = plan
        self.info = plan.mode  # the mode's row of the mode table
        self.data = data  # what DataFlex learnt of the training data while it loaded
        self.fa = trainer.finetuning_args
        self.rank, self.world = targs.process_index, targs.world_size
        self.agreement = Agreement(self.rank, self.world)
        self.per_device = targs.per_device_train_batch_size
        self.ga = targs.gradient_accumulation_steps
        self.global_batch = self.per_device * self.ga * self.world
        self.spec = plan.spec
        self.component = plan.component
        self.cache_dir = plan.cache_dir
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
        self.pending_logs: dict[str, float] = {}  # the component's statistics for the next training log
        self.resumed_at: int | None = None  # the checkpoint's step, when the run resumed
        self.resumed_from: str | None = None
        self._scorer: ScoringEngine | None = None
        self.work = DecisionWork()  # the token passes of the scoring engine's maps, the whole run (all ranks)

    @property
    def args(self) -> Any:
        """The trainer's ``TrainingArguments``."""
        return self.trainer.args

    @property
    def step(self) -> int:
        """The optimizer step about to run (or running)."""
        return self.trainer.state.global_step

    def log(self, logs: dict[str, float]) -> None:
        """Log values through the trainer (its loggers and reporters)."""
        self.trainer.log(logs)

    def prepare(self, dataset: Any, description: str) -> Any:
        """``dataset`` as the trainer's loader would see it (unused columns removed)."""
        return self.trainer.df_prepare(dataset, description)[0]

    def steps(self, cycles: bool, update_step: int, update_times: int) -> int:
        """The run's optimizer steps for a schedule of stretches (see :func:`dataflex.schedule.total_steps`)."""
        fa, targs = self.fa, self.args
        return total_steps(fa.warmup_step, update_step, update_times, self.global_batch,
                           num_train_epochs=targs.num_train_epochs, max_steps=targs.max_steps,
                           train_step=fa.train_step, rows=len(self.train), cycles=cycles)

    def engine(self) -> ScoringEngine:
        """The scoring engine on the training model (built on first use)."""
        if self._scorer is None:
            t = self.trainer
            self._scorer = ScoringEngine(t.model, self.collator, t.args.device, agreement=self.agreement,
                                         work=self.work)
        return self._scorer

    def zero_stage(self) -> int | None:
        """The DeepSpeed ZeRO stage of this run, None without DeepSpeed."""
        t = self.trainer
        if not getattr(t, "is_deepspeed_enabled", False):
            return None
        plugin = getattr(t.accelerator.state, "deepspeed_plugin", None)
        return int(plugin.zero_stage) if plugin is not None else None


class ModeChecks:
    """The checks a mode makes before training (class level, no trainer yet); default: none."""

    orders_rows: ClassVar[bool] = True  # the schedule decides which rows each step sees (LF's sampler is unused)
    domains_apart: ClassVar[bool] = False  # every training dataset (domain) tokenized on its own, its rows known

    @classmethod
    def keeps_domains_apart(cls, component: Any) -> bool:
        """Whether this run needs every training dataset tokenized on its own (default: ``domains_apart``)."""
        return cls.domains_apart

    @classmethod
    def check_args(cls, args: Any) -> None:
        """Checks of DataFlex's keys alone (``args``: a ``DataFlexArguments``), run inside LLaMA-Factory's parser."""

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


class Mode(Protocol):
    """What the trainer asks of a mode (``ModeClass(ctx)`` builds one).

    ``default`` arguments are the parent trainer's own hooks, so a mode can wrap them without
    knowing the trainer's class.
    """

    name: ClassVar[str]  # as in the mode table
    ctx: ModeContext
    round: Any  # the mode's round (core.rounds.Round): state_dict, seconds, history, what, log

    def train_loader(self, default: Callable[[], Any]) -> Any:
        """The training dataloader."""

    def num_examples(self, dataloader: Any, default: Callable[[Any], int]) -> int:
        """The training examples the run will see."""

    def step_batches(self, epoch_iterator: Any, num_batches: int, device: Any, default: Callable) -> Any:
        """The coming optimizer step's micro-batches (``default``'s return shape)."""

    def loss_hook(self) -> Callable[[Any], Any] | None:
        """What the mode does with this micro-batch's per-sample losses: called with a
        :class:`~dataflex.modes.loss.LossSignals`, returns the loss weights (None: it needs none)."""

    def loss_inputs(self, inputs: dict[str, Any]) -> dict[str, Any]:
        """The training forward's inputs, with anything extra the loss hook needs."""

    def schedule_digest(self) -> list[Any] | None:
        """The schedule a resumed run must share with its checkpoint (None: no schedule)."""

    def schedule_manifest(self) -> dict[str, Any]:
        """``run.json``'s ``schedule``."""

    def round_state(self) -> dict[str, Any]:
        """The round's checkpoint state (called on every rank; may be a collective)."""

    def load_round_state(self, state: dict[str, Any]) -> None:
        """Restore the round from a checkpoint's state."""

    def start(self, log: Any) -> None:
        """Training starts (or resumes, ``ctx.resumed_at`` set) with these records."""

    def describe(self) -> None:
        """The mode's own lines about the run (rank 0 only; after the component's line)."""

    def metrics(self) -> dict[str, Any]:
        """The mode's own entries in the training output's metrics."""

    def finish_files(self) -> list[str]:
        """Files the mode writes when training ends (every rank calls it)."""
