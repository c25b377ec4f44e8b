"""Diagnostics: what benchmarks, experiments and tests use to look inside DataFlex without training.

Nothing in the product imports this module (an import contract in pyproject.toml keeps it so):
it sits on top, beside the CLI.

* :func:`load_pipeline` builds the model, tokenizer, tokenized datasets and collator exactly as
  LLaMA-Factory's training workflow would for a configuration (DataFlex's own data loading
  included, e.g. per-domain tokenization under ``dynamic_mix``), then stops: a scorer or a
  selector can be run on real data by hand.
* The decision trace is a plugin (docs/plugins.md): with ``DATAFLEX_PLUGINS=dataflex.diagnostics``
  and ``DATAFLEX_TRACE_DIR=FOLDER`` every training process appends, per training micro-batch, one
  JSON line ``{"step", "indices", ["weights"], ["domains"], ["tokens"], ["lengths"]}`` to
  ``FOLDER/trace_rank{R}.jsonl``: the rows each rank trained on, with their weights and domains.
  :func:`read_trace` reads such a folder back.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from .report.reader import read_trace  # noqa: F401 - the reader of a trace folder, offered here beside the plugin that writes it

TRACE_ENV = "DATAFLEX_TRACE_DIR"

_INSTALLED = False


# --------------------------------------------------------------------------------------------- the pipeline
def load_pipeline(cfg: dict[str, Any]) -> dict[str, Any]:
    """Model, tokenizer, tokenized datasets and collator for the training config ``cfg``, without training.

    Returns ``{"model", "tokenizer", "train_dataset", "eval_dataset", "collator", "training_args",
    "finetuning_args", "data_info"}`` (``data_info``: what DataFlex learnt of the data, e.g. each
    domain's rows).
    """
    from . import integration
    from .modes import BY_TRAIN_TYPE
    from .plan import RunPlan

    run = integration.Run(RunPlan(dict(cfg), BY_TRAIN_TYPE.get(cfg.get("train_type"))))
    pipe = integration.build_pipeline(cfg, run)
    pipe.pop("template")
    return {**pipe, "data_info": run.data}


# --------------------------------------------------------------------------------------------- the trace
def install() -> None:
    """The trace plugin: active when ``DATAFLEX_TRACE_DIR`` is set (called through ``DATAFLEX_PLUGINS``)."""
    global _INSTALLED
    folder = os.environ.get(TRACE_ENV)
    if _INSTALLED or not folder:
        return
    _INSTALLED = True
    from .modes.base import DOMAIN_KEY, INDEX_KEY, WEIGHT_KEY
    from .trainer import DataFlexTrainerMixin

    original = DataFlexTrainerMixin.compute_loss

    def compute_loss(self, model, inputs, *args: Any, **kwargs: Any):
        if INDEX_KEY in inputs and model.training:
            line: dict[str, Any] = {"step": self.state.global_step, "indices": inputs[INDEX_KEY].tolist()}
            if inputs.get(WEIGHT_KEY) is not None:
                line["weights"] = [float(w) for w in inputs[WEIGHT_KEY]]
            if inputs.get(DOMAIN_KEY) is not None:
                line["domains"] = inputs[DOMAIN_KEY].tolist()
            if inputs.get("labels") is not None:  # supervised tokens per row, as the loss counts them
                line["tokens"] = (inputs["labels"][:, 1:] != -100).sum(dim=1).tolist()
            if inputs.get("attention_mask") is not None:  # non-padding tokens per row, as a forward sees them
                line["lengths"] = (inputs["attention_mask"] != 0).sum(dim=1).tolist()
            path = Path(folder) / f"trace_rank{self.args.process_index}.jsonl"
            path.parent.mkdir(parents=True, exist_ok=True)
            with path.open("a", encoding="utf-8") as fh:
                fh.write(json.dumps(line) + "\n")
        return original(self, model, inputs, *args, **kwargs)

    DataFlexTrainerMixin.compute_loss = compute_loss
