"""The only module that touches LLaMA-Factory internals (0.9.5).

Two patches, applied by :func:`install` in every process (torchrun children re-import
everything, so the launcher module installs them too):

1. ``llamafactory.hparams.parser._TRAIN_ARGS``: LLaMA-Factory's ``FinetuningArguments`` is
   replaced by a subclass carrying DataFlex's keys, so they are parsed - and unknown keys are
   still rejected - by LLaMA-Factory's own ``HfArgumentParser``.
2. ``llamafactory.train.sft.workflow.CustomSeq2SeqTrainer``: the SFT workflow builds our
   trainer when ``train_type`` is set, and LLaMA-Factory's own trainer otherwise.

A LLaMA-Factory upgrade that renames these is a change to this file only.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any

from .args import DataFlexArguments

_INSTALLED = False
# What the last get_dataset call loaded: {"train": {"dataset_dir", "parts": [[name, start, end], ...]}}
_DATA_SOURCES: dict[str, Any] = {}


def _classes():
    from llamafactory.hparams.finetuning_args import FinetuningArguments
    from llamafactory.train.sft.trainer import CustomSeq2SeqTrainer

    return FinetuningArguments, CustomSeq2SeqTrainer


def _build_types():
    FinetuningArguments, CustomSeq2SeqTrainer = _classes()
    from .trainer import DynamicSelectMixin

    @dataclass
    class DataFlexFinetuningArguments(FinetuningArguments, DataFlexArguments):
        """LLaMA-Factory's finetuning arguments plus DataFlex's keys."""

        def __post_init__(self) -> None:
            super().__post_init__()
            self.check_dataflex_args()

    class DataFlexSeq2SeqTrainer(DynamicSelectMixin, CustomSeq2SeqTrainer):
        """LLaMA-Factory's SFT trainer fed by DataFlex's selection schedule."""

        def df_data_sources(self) -> dict[str, Any] | None:
            return _DATA_SOURCES.get("train")

    return DataFlexFinetuningArguments, DataFlexSeq2SeqTrainer, CustomSeq2SeqTrainer


def install() -> None:
    """Patch LLaMA-Factory in this process (idempotent)."""
    global _INSTALLED
    if _INSTALLED:
        return
    import llamafactory.hparams.parser as parser
    import llamafactory.train.sft.workflow as workflow

    args_cls, trainer_cls, original = _build_types()
    parser._TRAIN_ARGS[:] = [args_cls if cls.__name__ == "FinetuningArguments" else cls for cls in parser._TRAIN_ARGS]

    def make_trainer(*args: Any, finetuning_args: Any, **kwargs: Any):
        cls = trainer_cls if getattr(finetuning_args, "train_type", None) else original
        return cls(*args, finetuning_args=finetuning_args, **kwargs)

    workflow.CustomSeq2SeqTrainer = make_trainer
    workflow.get_dataset = _tracking_get_dataset(workflow.get_dataset)
    _INSTALLED = True


def _tracking_get_dataset(get_dataset):
    """Wrap LLaMA-Factory's get_dataset to remember which rows of the train set come from which
    dataset (for `dataflex-cli report`). Only possible for a plain concatenation: with
    interleaving, val_size splitting, streaming or a pre-tokenized set the mapping is left unknown.
    """
    import llamafactory.data.loader as loader

    def wrapped(template, model_args, data_args, training_args, stage, **kwargs):
        sizes: list[tuple[str, int]] = []
        original = loader._load_single_dataset

        def recording(dataset_attr, *args, **kw):
            ds = original(dataset_attr, *args, **kw)
            try:
                sizes.append((dataset_attr.dataset_name, len(ds)))
            except TypeError:  # streaming: no length
                pass
            return ds

        loader._load_single_dataset = recording
        try:
            module = get_dataset(template, model_args, data_args, training_args, stage, **kwargs)
        finally:
            loader._load_single_dataset = original
        _DATA_SOURCES.pop("train", None)
        names = list(data_args.dataset or [])
        train = module.get("train_dataset")
        plain = (data_args.mix_strategy == "concat" and not data_args.streaming and data_args.tokenized_path is None
                 and (data_args.val_size or 0) < 1e-6 and len(sizes) >= len(names))
        if plain and train is not None and sum(n for _, n in sizes[: len(names)]) == len(train):
            parts, start = [], 0
            for name, (_, n) in zip(names, sizes):
                parts.append([name, start, start + n])
                start += n
            _DATA_SOURCES["train"] = {"dataset_dir": os.path.abspath(data_args.dataset_dir), "parts": parts}
        return module

    return wrapped


def known_train_keys() -> set[str]:
    """Every key LLaMA-Factory's train parser accepts once DataFlex is installed."""
    import llamafactory.hparams.parser as parser

    install()
    return {f.name for cls in parser._TRAIN_ARGS for f in dataclasses.fields(cls) if f.init}


def run_train(cfg: dict[str, Any]) -> None:
    """Run LLaMA-Factory's training entry point on an already-validated config dict."""
    install()
    from llamafactory.train.tuner import run_exp

    run_exp(args=cfg)


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


def registered_datasets(dataset_dir: str) -> dict[str, Any] | None:
    """``{name: attributes}`` of ``{dataset_dir}/dataset_info.json``, or None when there is no such file."""
    import json
    import os

    path = os.path.join(dataset_dir, "dataset_info.json")
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as fh:
        return dict(json.load(fh))


def load_pipeline(cfg: dict[str, Any]) -> dict[str, Any]:
    """Model, tokenizer, tokenized datasets and collator exactly as LLaMA-Factory's SFT workflow
    builds them for ``cfg`` - without training. Used by benchmarks and tests to score real data.
    """
    install()
    from llamafactory.data import SFTDataCollatorWith4DAttentionMask, get_dataset, get_template_and_fix_tokenizer
    from llamafactory.extras.constants import IGNORE_INDEX
    from llamafactory.hparams import get_train_args
    from llamafactory.model import load_model, load_tokenizer

    model_args, data_args, training_args, finetuning_args, _ = get_train_args(dict(cfg))
    tokenizer_module = load_tokenizer(model_args)
    tokenizer = tokenizer_module["tokenizer"]
    template = get_template_and_fix_tokenizer(tokenizer, data_args)
    dataset_module = get_dataset(template, model_args, data_args, training_args, stage="sft", **tokenizer_module)
    model = load_model(tokenizer, model_args, finetuning_args, training_args.do_train)
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
    return {
        "model": model,
        "tokenizer": tokenizer,
        "train_dataset": dataset_module.get("train_dataset"),
        "eval_dataset": dataset_module.get("eval_dataset"),
        "collator": collator,
        "training_args": training_args,
        "finetuning_args": finetuning_args,
    }
