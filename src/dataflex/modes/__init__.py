"""The mode table: every ``train_type`` DataFlex serves, and where each of its parts lives.

This is the only list of modes. The YAML check, the components file, ``dataflex-cli list``, the
trainer and the report all read it; a new mode is one row here, one module beside this file, one
report module in ``dataflex/report/modes/`` and one component package. The table is plain data, so
reading it imports neither torch nor a mode.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ModeInfo:
    train_type: str  # the value of `train_type:` in a training YAML
    name: str  # the short name in records, manifests and checkpoints ("select")
    section: str  # the components-file section and component kind ("selectors")
    singular: str  # one component of that section, in messages ("selector")
    plot_file: str  # the PNG `plot_loss: true` writes beside LLaMA-Factory's loss curve
    mode_cls: str  # the mode's class, "module:Class" under dataflex.modes
    base: str  # the components' base class, "package.module:Class" under dataflex
    lines: str | None = None  # the per-step JSON-lines record the report reads (None: the step_N.json records)
    report: str = ""  # the mode's report module, "package.module" under dataflex (text, HTML, plot, export rule)
    any_name: bool = False  # every entry of the section is the base class; its `name:` is only a label (pipelines)

    @property
    def module(self) -> Any:
        """The mode's module: its round and its trainer hooks."""
        return importlib.import_module(f"{__name__}.{self.mode_cls.partition(':')[0]}")

    def mode_class(self) -> type:
        return getattr(self.module, self.mode_cls.partition(":")[2])

    def base_class(self) -> type:
        where, _, cls = self.base.partition(":")
        return getattr(importlib.import_module(f"dataflex.{where}"), cls)

    def report_module(self) -> Any:
        """The mode's report module (torch-free): what ``dataflex-cli report`` shows of the mode's runs."""
        return importlib.import_module(f"dataflex.{self.report}")

    def package(self) -> Any:
        """The component package (importing it registers every built-in component of the section)."""
        return importlib.import_module(f"dataflex.{self.section}")


TABLE = (
    ModeInfo("dynamic_select", "select", "selectors", "selector", "dataflex_selection.png", "select:SelectMode",
             "selectors.base:Selector", report="report.modes.select"),
    ModeInfo("dynamic_mix", "mix", "mixers", "mixer", "dataflex_proportions.png", "mix:MixMode",
             "mixers.base:Mixer", report="report.modes.mix"),
    ModeInfo("dynamic_weight", "weight", "weighters", "weighter", "dataflex_weights.png", "weight:WeightMode",
             "weighters.base:Weighter", lines="weights.jsonl", report="report.modes.weight"),
    ModeInfo("dynamic_reorder", "reorder", "reorderers", "reorderer", "dataflex_order.png", "reorder:ReorderMode",
             "reorderers.base:Reorderer", lines="order.jsonl", report="report.modes.reorder"),
    ModeInfo("dynamic_lego", "lego", "pipelines", "pipeline", "dataflex_pipeline.png", "lego:LegoMode",
             "pipelines:Pipeline", report="report.modes.lego", any_name=True),
)

TRAIN_TYPES = tuple(m.train_type for m in TABLE)
SECTIONS = tuple(m.section for m in TABLE)
BY_TRAIN_TYPE = {m.train_type: m for m in TABLE}
BY_SECTION = {m.section: m for m in TABLE}
BY_NAME = {m.name: m for m in TABLE}
