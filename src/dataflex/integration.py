"""The only module that touches LLaMA-Factory internals (0.9.5).

Patches (torchrun children re-import everything, so each one applies them itself):

1. ``llamafactory.hparams.parser._TRAIN_ARGS`` (:func:`install`, once per process): LLaMA-Factory's
   ``FinetuningArguments`` is replaced by a subclass carrying DataFlex's keys, so they are parsed -
   and unknown keys are still rejected - by LLaMA-Factory's own ``HfArgumentParser``.

The others are bound to one :class:`Run` (its plan, what was learnt of its data) for the time
:func:`run_train` runs it, and put back afterwards:

2. The SFT and PT workflows' trainer classes (``CustomSeq2SeqTrainer``, ``CustomTrainer``): the
   workflow builds DataFlex's trainer when ``train_type`` is set, LLaMA-Factory's otherwise.
3. The workflows' ``get_dataset``: for ``dynamic_mix`` every dataset of ``dataset: a,b,c`` (a
   *domain*) is tokenized on its own, so every row belongs to exactly one domain (with
   ``stage: pt`` no block of ``cutoff_len`` tokens crosses two domains), and the
   ``mixer_eval_dataset`` sets are tokenized one by one; otherwise LLaMA-Factory's own loader
   runs and only notes which rows come from which dataset (plain concatenation only). A dataset
   file with a column that mixes value types (numbers and a string) becomes a one-line error
   naming the dataset and the column, in either case.
4. ``llamafactory.train.tuner.get_train_args``: notes that the configuration was accepted, so
   the CLI can tell a configuration error from a failure during training.
5. The workflows' last step (``create_modelcard_and_push``) is followed by a barrier, so every
   rank waits until the others have written everything before the process group goes.
6. ``llamafactory.train.tuner.EarlyStoppingCallback``: built with ``early_stopping_min_delta`` as
   its ``early_stopping_threshold`` (LLaMA-Factory passes only the patience).

A LLaMA-Factory upgrade that renames these is a change to this file only.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator

from .args import DataFlexArguments
from .errors import ConfigError
from .plugins import install_plugins
from .values import names

_INSTALLED = False


@dataclass
class DataInfo:
    """What DataFlex learnt about the training data while LLaMA-Factory loaded it."""

    dataset_dir: str | None = None
    parts: list[list[Any]] | None = None  # [[name, start, end], ...] of the train set, when known
    exact: bool = False  # parts come from per-domain tokenization (dynamic_mix)
    mixer_eval: list[Any] = field(default_factory=list)  # tokenized mixer_eval_dataset sets, in order
    mixer_eval_names: list[str] = field(default_factory=list)
    columns: dict[str, list[Any]] = field(default_factory=dict)  # raw columns a mode asked for, per training row


class Run:
    """One training run in this process: its plan, what DataFlex learnt of its data, how far it got."""

    def __init__(self, plan: Any):
        self.plan = plan
        self.data = DataInfo()
        self.configured = False  # LLaMA-Factory has accepted the arguments

    @property
    def domains_apart(self) -> bool:
        """Whether the run's mode needs every dataset of ``dataset`` tokenized on its own."""
        mode = self.plan.mode if self.plan is not None else None
        return mode is not None and mode.mode_class().keeps_domains_apart(self.plan.component)

    @property
    def columns(self) -> list[str]:
        """Raw dataset columns the run's mode needs, one value per training row."""
        mode = self.plan.mode if self.plan is not None else None
        return mode.mode_class().data_columns(self.plan.component) if mode is not None else []


def _classes():
    from llamafactory.hparams.finetuning_args import FinetuningArguments
    from llamafactory.train.pt.trainer import CustomTrainer
    from llamafactory.train.sft.trainer import CustomSeq2SeqTrainer

    return FinetuningArguments, CustomSeq2SeqTrainer, CustomTrainer


def _build_types():
    FinetuningArguments, CustomSeq2SeqTrainer, CustomTrainer = _classes()
    from .trainer import DataFlexTrainerMixin

    @dataclass
    class DataFlexFinetuningArguments(FinetuningArguments, DataFlexArguments):
        """LLaMA-Factory's finetuning arguments plus DataFlex's keys."""

        def __post_init__(self) -> None:
            super().__post_init__()
            self.check_dataflex_args()

    class DataFlexSeq2SeqTrainer(DataFlexTrainerMixin, CustomSeq2SeqTrainer):
        """LLaMA-Factory's SFT trainer driven by DataFlex."""

    class DataFlexPtTrainer(DataFlexTrainerMixin, CustomTrainer):
        """LLaMA-Factory's pre-training trainer driven by DataFlex."""

    return DataFlexFinetuningArguments, DataFlexSeq2SeqTrainer, DataFlexPtTrainer


def _factory(dataflex_cls, original, run: Run):
    def make_trainer(*args: Any, finetuning_args: Any, **kwargs: Any):
        if getattr(finetuning_args, "train_type", None):
            return dataflex_cls(*args, finetuning_args=finetuning_args, dataflex_plan=run.plan,
                                dataflex_data=run.data, **kwargs)
        return original(*args, finetuning_args=finetuning_args, **kwargs)

    return make_trainer


_TRAINER_TYPES: tuple[Any, Any] | None = None


def install() -> None:
    """Give LLaMA-Factory's argument parser DataFlex's keys in this process (idempotent)."""
    global _INSTALLED, _TRAINER_TYPES
    if _INSTALLED:
        return
    import llamafactory.hparams.parser as parser

    args_cls, sft_cls, pt_cls = _build_types()
    parser._TRAIN_ARGS[:] = [args_cls if cls.__name__ == "FinetuningArguments" else cls for cls in parser._TRAIN_ARGS]
    _TRAINER_TYPES = (sft_cls, pt_cls)
    _INSTALLED = True


@contextmanager
def _bound(run: Run) -> Iterator[None]:
    """LLaMA-Factory's workflows build DataFlex's trainer and data for ``run`` while this is open."""
    import llamafactory.train.pt.workflow as pt_workflow
    import llamafactory.train.sft.workflow as sft_workflow
    import llamafactory.train.tuner as tuner

    install()
    sft_cls, pt_cls = _TRAINER_TYPES
    saved = [(m, name, getattr(m, name)) for m in (sft_workflow, pt_workflow)
             for name in ("get_dataset", "create_modelcard_and_push")]
    saved += [(sft_workflow, "CustomSeq2SeqTrainer", sft_workflow.CustomSeq2SeqTrainer),
              (pt_workflow, "CustomTrainer", pt_workflow.CustomTrainer), (tuner, "get_train_args", tuner.get_train_args)]
    sft_workflow.CustomSeq2SeqTrainer = _factory(sft_cls, sft_workflow.CustomSeq2SeqTrainer, run)
    pt_workflow.CustomTrainer = _factory(pt_cls, pt_workflow.CustomTrainer, run)
    for workflow in (sft_workflow, pt_workflow):
        workflow.get_dataset = dataset_loader(workflow.get_dataset, run)
        workflow.create_modelcard_and_push = _then_barrier(workflow.create_modelcard_and_push)
    # early_stopping_min_delta becomes the threshold of the EarlyStoppingCallback LLaMA-Factory builds
    saved.append((tuner, "EarlyStoppingCallback", tuner.EarlyStoppingCallback))
    tuner.EarlyStoppingCallback = functools.partial(
        tuner.EarlyStoppingCallback, early_stopping_threshold=float(run.plan.cfg.get("early_stopping_min_delta", 0.0)))
    original_get_train_args = tuner.get_train_args

    def get_train_args(*args: Any, **kwargs: Any):
        out = original_get_train_args(*args, **kwargs)
        run.configured = True
        return out

    tuner.get_train_args = get_train_args
    try:
        yield
    finally:
        for module, name, value in saved:
            setattr(module, name, value)


def _then_barrier(last_step):
    """The workflow's last step, then a barrier: no rank leaves while another still writes its outputs
    (``dataflex.launcher.exit_without_teardown`` relies on it)."""

    def wrapped(*args: Any, **kwargs: Any):
        out = last_step(*args, **kwargs)
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.barrier()
        return out

    return wrapped


# --------------------------------------------------------------------------------------------- data
def dataset_loader(get_dataset, run: Run):
    """LLaMA-Factory's ``get_dataset`` as DataFlex runs it for ``run`` (per-domain tokenization under a
    mode that keeps the domains apart; otherwise LLaMA-Factory's own, noting each dataset's rows and
    reading the columns the mode asked for). ``run.data`` holds what was learnt."""

    def wrapped(template, model_args, data_args, training_args, stage, **kwargs):
        if run.domains_apart:
            eval_names = names(run.plan.cfg.get("mixer_eval_dataset"))
            module, run.data = _domain_datasets(eval_names, template, model_args, data_args, training_args, stage,
                                                **kwargs)
            return module
        wanted = run.columns
        module, parts, columns = _tracked(get_dataset, template, model_args, data_args, training_args, stage,
                                          columns=wanted, owner=f"component '{run.plan.spec.key}'" if wanted else "",
                                          **kwargs)
        if wanted and parts is None:
            raise ConfigError(f"component '{run.plan.spec.key}': param 'column' = '{wanted[0]}': the training rows "
                              "cannot be matched to dataset rows (rows were dropped during preprocessing, or "
                              "mix_strategy / val_size / packing / tokenized_path changed them); allowed: plain "
                              "concatenated datasets")
        run.data = DataInfo(dataset_dir=os.path.abspath(data_args.dataset_dir), parts=parts, columns=columns)
        return module

    return wrapped


def _tracked(get_dataset, template, model_args, data_args, training_args, stage, columns=(), owner="", **kwargs):
    """LLaMA-Factory's get_dataset, noting how many rows each dataset contributes (plain concat only) and
    reading the raw ``columns`` of the training datasets (before LLaMA-Factory's alignment drops them)."""
    import llamafactory.data.loader as loader

    sizes: list[tuple[str, int]] = []
    original = loader._load_single_dataset
    original_align = loader.align_dataset
    original_merged = loader._get_merged_dataset
    train_names = list(data_args.dataset or [])
    captured: list[dict[str, list[Any]]] = []

    def capturing(dataset, dataset_attr, *args, **kw):
        if columns and len(captured) < len(train_names):  # the training datasets load first, then eval
            have = list(getattr(dataset, "column_names", None) or [])
            got = {}
            for col in columns:
                if col not in have:
                    raise ConfigError(f"{owner}: param 'column' = '{col}' is not a column of dataset "
                                      f"'{train_names[len(captured)]}'; its columns: {', '.join(have) or 'none'}")
                got[col] = list(dataset[col])
            captured.append(got)
        return original_align(dataset, dataset_attr, *args, **kw)

    loading: dict[str, Any] = {"names": [], "next": 0}  # the registered names being loaded, and which one is next

    def merging(dataset_names, *args, **kw):
        loading["names"], loading["next"] = list(dataset_names or []), 0
        return original_merged(dataset_names, *args, **kw)

    def recording(dataset_attr, *args, **kw):
        at = loading["next"]
        loading["next"] += 1
        with _readable(loading["names"][at] if at < len(loading["names"]) else dataset_attr.dataset_name):
            ds = original(dataset_attr, *args, **kw)
        try:
            sizes.append((dataset_attr.dataset_name, len(ds)))
        except TypeError:  # streaming: no length
            pass
        return ds

    loader._load_single_dataset = recording
    loader.align_dataset = capturing
    loader._get_merged_dataset = merging
    try:
        module = get_dataset(template, model_args, data_args, training_args, stage, **kwargs)
    finally:
        loader._load_single_dataset = original
        loader.align_dataset = original_align
        loader._get_merged_dataset = original_merged
    names = list(data_args.dataset or [])
    train = module.get("train_dataset")
    plain = (data_args.mix_strategy == "concat" and not data_args.streaming and data_args.tokenized_path is None
             and (data_args.val_size or 0) < 1e-6 and len(sizes) >= len(names) and stage != "pt")
    parts = None
    if plain and train is not None and sum(n for _, n in sizes[: len(names)]) == len(train):
        parts, start = [], 0
        for name, (_, n) in zip(names, sizes):
            parts.append([name, start, start + n])
            start += n
    values = {col: [v for part in captured for v in part[col]] for col in columns} if captured else {}
    return module, parts, values


@contextmanager
def _readable(name: str) -> Iterator[None]:
    """A dataset file whose column holds values of different types (numbers in most rows, a string in
    one) fails inside the ``datasets`` builder; that becomes a one-line error naming the dataset and
    the column. Any other failure is left as it is."""
    try:
        yield
    except Exception as err:  # noqa: BLE001 - only a recognised column-type failure is rewritten
        problem = _column_problem(err)
        if problem is None:
            raise
        column, reason = problem
        raise ConfigError(f"dataset '{name}': column '{column}' cannot be read ({reason}); allowed: one type in "
                          "every row of a column (e.g. numbers only)") from None


def _column_problem(err: BaseException) -> tuple[str, str] | None:
    """(column, reason) when ``err`` or an exception it was raised from is Arrow refusing a column's values."""
    import re

    parts: list[str] = []
    seen: set[int] = set()
    cause: BaseException | None = err
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        parts += [str(a) for a in cause.args] or [str(cause)]
        cause = cause.__cause__ or cause.__context__
    for text in parts:  # pandas route: ("Could not convert 'x' with type str: ...", "Conversion failed for column c ...")
        found = re.search(r"Conversion failed for column (.+?) with type", text)
        if found:
            reason = next((p for p in parts if p.startswith("Could not convert")), "mixed value types")
            return found.group(1), reason[0].lower() + reason[1:]
    for text in parts:  # Arrow's JSON reader: "JSON parse error: Column(/c) changed from number to string in row 5"
        found = re.search(r"Column\(/?([^)]+)\) (changed from \w+ to \w+ in row \d+)", text)
        if found:
            return found.group(1), found.group(2)
    return None


def _domain_datasets(eval_names, template, model_args, data_args, training_args, stage, tokenizer, processor=None):
    """Every domain tokenized on its own, then concatenated (``dynamic_mix``)."""
    from datasets import concatenate_datasets
    from llamafactory.data import loader
    from llamafactory.data.data_utils import split_dataset

    domains = list(data_args.dataset or [])
    local = not data_args.data_shared_file_system
    with training_args.main_process_first(desc="load dataset", local=local):
        raw = []
        for name in domains:
            with _readable(name):
                raw.append(loader._get_merged_dataset([name], model_args, data_args, training_args, stage))
        eval_raw = loader._get_merged_dataset(data_args.eval_dataset, model_args, data_args, training_args, stage,
                                              return_dict=data_args.eval_on_each_dataset)
        mixer_raw = [loader._get_merged_dataset([name], model_args, data_args, training_args, stage)
                     for name in eval_names]
    with training_args.main_process_first(desc="pre-process dataset", local=local):
        tokenized = [loader._get_preprocessed_dataset(ds, data_args, training_args, stage, template, tokenizer,
                                                      processor, is_eval=False) for ds in raw]
        parts, start = [], 0
        for name, ds in zip(domains, tokenized):
            if len(ds) == 0:
                raise ConfigError(f"dataset: domain '{name}' has no rows after tokenization"
                                  + (f" (its texts are shorter than cutoff_len {data_args.cutoff_len}?)" if stage == "pt" else ""))
            parts.append([name, start, start + len(ds)])
            start += len(ds)
        train = concatenate_datasets(tokenized)
        _, eval_dict = split_dataset(None, eval_raw, data_args, seed=training_args.seed)
        for key in eval_dict:
            eval_dict[key] = loader._get_preprocessed_dataset(eval_dict[key], data_args, training_args, stage, template,
                                                              tokenizer, processor, is_eval=True)
        mixer_eval = [loader._get_preprocessed_dataset(ds, data_args, training_args, stage, template, tokenizer,
                                                       processor, is_eval=True) for ds in mixer_raw]
    module: dict[str, Any] = {"train_dataset": train}
    if "validation" in eval_dict:
        module["eval_dataset"] = eval_dict["validation"]
    elif eval_dict:
        module["eval_dataset"] = {k[len("validation_"):]: v for k, v in eval_dict.items()}
    info = DataInfo(dataset_dir=os.path.abspath(data_args.dataset_dir), parts=parts, exact=True,
                    mixer_eval=mixer_eval, mixer_eval_names=eval_names)
    return module, info



# --------------------------------------------------------------------------------------------- entry points
def build_pipeline(cfg: dict[str, Any], run: Run | None = None) -> dict[str, Any]:
    """Model, tokenizer, chat template, tokenized datasets and collator as LLaMA-Factory's SFT / PT
    workflow builds them for the training config ``cfg``, without training. With ``run``, the datasets
    go through DataFlex's loader (domains kept apart, raw columns) as in a DataFlex run; without, through
    LLaMA-Factory's own (a plain run)."""
    install()
    from llamafactory.data import SFTDataCollatorWith4DAttentionMask, get_dataset, get_template_and_fix_tokenizer
    from llamafactory.extras.constants import IGNORE_INDEX
    from llamafactory.hparams import get_train_args
    from llamafactory.model import load_model, load_tokenizer
    from transformers import DataCollatorForLanguageModeling

    model_args, data_args, training_args, finetuning_args, _ = get_train_args(dict(cfg))
    stage = finetuning_args.stage
    tokenizer_module = load_tokenizer(model_args)
    tokenizer = tokenizer_module["tokenizer"]
    template = get_template_and_fix_tokenizer(tokenizer, data_args)
    loader = dataset_loader(get_dataset, run) if run is not None else get_dataset
    dataset_module = loader(template, model_args, data_args, training_args, stage=stage, **tokenizer_module)
    model = load_model(tokenizer, model_args, finetuning_args, training_args.do_train)
    if stage == "pt":
        collator = DataCollatorForLanguageModeling(tokenizer=tokenizer, mlm=False)
    else:
        collator = SFTDataCollatorWith4DAttentionMask(
            template=template,
            model=model,
            pad_to_multiple_of=8,
            label_pad_token_id=IGNORE_INDEX if data_args.ignore_pad_token_for_loss else tokenizer.pad_token_id,
            block_diag_attn=model_args.block_diag_attn,
            neat_packing=data_args.neat_packing,
            attn_implementation=getattr(model.config, "_attn_implementation", None),
            compute_dtype=model_args.compute_dtype,
            **tokenizer_module,
        )
    return {"model": model, "tokenizer": tokenizer, "template": template, "collator": collator,
            "train_dataset": dataset_module.get("train_dataset"), "eval_dataset": dataset_module.get("eval_dataset"),
            "training_args": training_args, "finetuning_args": finetuning_args}


def chat_template(tokenizer: Any, name: str | None) -> Any:
    """LLaMA-Factory's template ``name`` for ``tokenizer`` (it encodes a turn as training does)."""
    from llamafactory.data import get_template_and_fix_tokenizer
    from llamafactory.hparams import DataArguments

    return get_template_and_fix_tokenizer(tokenizer, DataArguments(template=name))


def known_train_keys() -> set[str]:
    """Every key LLaMA-Factory's train parser accepts once DataFlex is installed."""
    import llamafactory.hparams.parser as parser

    install()
    return {f.name for cls in parser._TRAIN_ARGS for f in dataclasses.fields(cls) if f.init}


def run_train(run: Run) -> None:
    """Run LLaMA-Factory's training entry point on the checked configuration of ``run``'s plan."""
    install()
    from llamafactory.train.tuner import run_exp

    install_plugins()  # DATAFLEX_PLUGINS: the user's modules, installed in every training process
    with _bound(run):
        run_exp(args=run.plan.cfg)


def run_export(cfg: dict[str, Any]) -> None:
    from llamafactory.train.tuner import export_model

    export_model(args=cfg)


def launch_plan() -> dict[str, Any]:
    """What ``llamafactory-cli train`` would decide about distributed launching, in this environment."""
    from llamafactory.extras.misc import get_device_count, is_env_enabled, use_kt, use_ray

    return {
        "force_torchrun": is_env_enabled("FORCE_TORCHRUN"),
        "device_count": get_device_count(),
        "ray_or_kt": use_ray() or use_kt(),
    }


def dataset_registry(dataset_dir: str) -> dict[str, Any] | None:
    """``{name: attributes}`` of ``{dataset_dir}/dataset_info.json``, or None when there is no such file."""
    import json

    path = os.path.join(dataset_dir, "dataset_info.json")
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except (OSError, ValueError) as err:
        raise ConfigError(f"dataset_dir: {path} is not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"dataset_dir: {path} must hold a mapping of dataset names")
    return data


def dataset_entry(name: str, dataset_dir: str) -> Any:
    """LLaMA-Factory's reading of one registered dataset (raises ValueError or KeyError when unusable)."""
    from llamafactory.data.parser import get_dataset_list

    (attr,) = get_dataset_list([name], dataset_dir)
    return attr
