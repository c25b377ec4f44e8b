"""Pipelines (``train_type: dynamic_lego``): a chain of existing components, each one a stage.

A pipeline is an entry of the components file's ``pipelines:`` section. Its ``stages`` name a
*family* (``selector``, ``mixer``, ``reorder``, ``weighter``) and a preset of that family's own
section; the presets are built exactly as their own modes build them. This package only reads
and checks the list and applies the composition rules (torch-free, no other component package):

1. index-space stages run select -> mix -> reorder; another written order is corrected, with a
   warning;
2. exactly one stage takes the update's rows (its *budget*): a select stage in ``mode: draw`` or a
   mixer; a select stage in ``mode: filter`` only shrinks the pool; when no stage takes the
   budget a uniform draw is placed after the filters (before a reorder stage, which arranges the
   update's rows and never changes their number);
3. loss-space stages multiply their per-sample weights: weighters, and a mixer whose decision acts on
   the loss (``acts_on = "loss"`` on its class: doremi's per-domain weights); such a mixer takes
   no rows, so it does not count as the budget-taker.

Which mixers act on the loss is known once the presets are built, so a pipeline composes its
stages in :meth:`Pipeline.resolve`.

How the stages run during training is :mod:`dataflex.modes.lego`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

from ..component import Component, register
from ..errors import ConfigError
from ..params import Params

logger = logging.getLogger("dataflex")

# family -> the components-file section its presets are read from
FAMILIES = {"selector": "selectors", "mixer": "mixers", "reorder": "reorderers", "weighter": "weighters"}
INDEX_ORDER = ("selector", "mixer", "reorder")  # the order index-space stages run in
STAGE_KEYS = ("family", "component", "warmup_step", "every", "enabled", "mode", "keep_ratio", "score_max_age")
SELECT_MODES = ("filter", "draw")
UNIFORM = "uniform"  # the family name of the appended uniform draw


@dataclass
class Stage:
    """One stage of a pipeline, as checked (``built``: its component, set when the preset is built)."""

    family: str  # selector | mixer | reorder | weighter | uniform (the appended draw)
    component: str  # the preset's key in its family's section ("" for the uniform draw)
    warmup_step: int = 0  # the stage takes part from this optimizer step on (passes its input through before)
    every: int = 1  # it decides again once this many steps have passed since its last decision
    mode: str | None = None  # selector only: filter | draw
    keep_ratio: float = 0.5  # selector filter: the share of the pool it keeps
    written: int = 0  # its position in the YAML list (0-based)
    built: Any = None
    loss_space: bool = False  # a mixer whose decision weighs the domains in the loss (set when it is built)

    @property
    def takes_budget(self) -> bool:
        return (self.family == "selector" and self.mode == "draw") or self.family == UNIFORM or \
            (self.family == "mixer" and not self.loss_space)

    @property
    def index_space(self) -> bool:
        return self.family != "weighter" and not self.loss_space

    @property
    def label(self) -> str:
        """``selector:loss`` / ``uniform`` (for messages and records)."""
        return self.family if self.family == UNIFORM else f"{self.family}:{self.component}"

    def is_active(self, step: int) -> bool:
        return step >= self.warmup_step

    def describe(self) -> str:
        bits = [self.label]
        if self.family == "selector":
            bits.append(self.mode + (f" keep {self.keep_ratio:g}" if self.mode == "filter" else ""))
        if self.warmup_step:
            bits.append(f"from step {self.warmup_step}")
        if self.loss_space:
            bits.append("weighs the domains' losses")
        if self.every > 1:
            bits.append(f"every {self.every} steps")
        return " ".join(bits)


def _int(where: str, key: str, value: Any, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(f"{where}: '{key}' = {value!r} is invalid; allowed: an integer >= {low}")
    return value


def parse_stage(pipeline: str, i: int, raw: Any) -> Stage | None:
    """One written stage, checked strictly; None for a stage with ``enabled: false``."""
    where = f"pipeline '{pipeline}': stage {i + 1}"
    if not isinstance(raw, dict):
        raise ConfigError(f"{where} must be a mapping (family, component, ...), got {type(raw).__name__}")
    unknown = sorted(set(raw) - set(STAGE_KEYS))
    if unknown:
        raise ConfigError(f"{where}: unknown key '{unknown[0]}'; allowed: {', '.join(STAGE_KEYS)}")
    family = raw.get("family")
    if family not in FAMILIES:
        raise ConfigError(f"{where}: family {family!r} is unknown; allowed: {', '.join(FAMILIES)}")
    component = raw.get("component")
    if not isinstance(component, str) or not component:
        raise ConfigError(f"{where}: 'component' is required (a preset of the components file's "
                          f"{FAMILIES[family]} section)")
    where = f"pipeline '{pipeline}': stage {i + 1} ({family} '{component}')"
    enabled = raw.get("enabled", True)
    if not isinstance(enabled, bool):
        raise ConfigError(f"{where}: 'enabled' = {enabled!r} is invalid; allowed: true, false")
    warmup = _int(where, "warmup_step", raw.get("warmup_step", 0) or 0, 0)
    every = _int(where, "every", raw.get("every", 1), 1)
    if "score_max_age" in raw:
        _int(where, "score_max_age", raw["score_max_age"], 0)
        logger.warning("[DataFlex] %s: 'score_max_age' has no effect here (every stage scores the rows it is given "
                       "itself; no score is shared between stages)", where)
    mode = raw.get("mode")
    keep = raw.get("keep_ratio")
    if family == "selector":
        mode = "filter" if mode is None else mode
        if mode not in SELECT_MODES:
            raise ConfigError(f"{where}: 'mode' = {mode!r} is invalid; allowed: {', '.join(SELECT_MODES)}")
        if keep is not None and mode == "draw":
            raise ConfigError(f"{where}: 'keep_ratio' only applies to mode: filter (a draw takes the update's rows)")
        keep = 0.5 if keep is None else keep
        if isinstance(keep, bool) or not isinstance(keep, (int, float)) or not 0.0 < float(keep) <= 1.0:
            raise ConfigError(f"{where}: 'keep_ratio' = {keep!r} is invalid; allowed: a number in (0, 1]")
    else:
        for key in ("mode", "keep_ratio"):
            if key in raw:
                raise ConfigError(f"{where}: '{key}' only applies to selector stages")
        keep = 0.5
    if family == "weighter" and every != 1:
        logger.warning("[DataFlex] %s: 'every' has no effect on a weighter stage (it weighs every step from its "
                       "warmup_step on)", where)
    if not enabled:
        return None
    return Stage(family, component, warmup, every, mode, float(keep), written=i)


def compose(pipeline: str, written: list[Stage], warn: bool = True) -> list[Stage]:
    """The stages in the order they run, with the composition rules applied (see the module's docstring)."""
    if not written:
        raise ConfigError(f"pipeline '{pipeline}': no enabled stage; a pipeline needs at least one stage "
                          f"(family: {', '.join(FAMILIES)})")
    index = [s for s in written if s.index_space]
    loss = [s for s in written if not s.index_space]
    reweighting = [s for s in loss if s.family == "mixer"]
    if len(reweighting) > 1:
        raise ConfigError(f"pipeline '{pipeline}': {len(reweighting)} mixer stages that weigh the domains' losses "
                          f"(stages {', '.join(str(s.written + 1) for s in reweighting)}); allowed: at most one")
    for family in INDEX_ORDER:
        same = [s for s in index if s.family == family]
        if len(same) > 1:
            raise ConfigError(f"pipeline '{pipeline}': {len(same)} {family} stages (stages "
                              f"{', '.join(str(s.written + 1) for s in same)}); allowed: at most one per family")
    rank = {f: i for i, f in enumerate(INDEX_ORDER)}
    ordered = sorted(index, key=lambda s: rank[s.family])
    if ordered != index and warn:
        logger.warning("[DataFlex] pipeline '%s': stages written as %s run as %s (index-space stages always run "
                       "select -> mix -> reorder)", pipeline, " -> ".join(s.label for s in index),
                       " -> ".join(s.label for s in ordered))
    takers = [s for s in ordered if s.takes_budget]
    if len(takers) > 1:
        raise ConfigError(f"pipeline '{pipeline}': {' and '.join(s.label for s in takers)} both take the update's "
                          "rows; allowed: one budget-taker (a selector in mode: draw, or a mixer); "
                          "set mode: filter on the selector to let it only shrink the pool")
    if not takers:
        at = next((i for i, s in enumerate(ordered) if s.family == "reorder"), len(ordered))
        ordered.insert(at, Stage(UNIFORM, "", written=-1))
    return ordered + reweighting + [s for s in loss if s.family != "mixer"]


@dataclass
class PipelineParams(Params):
    stages: list[dict[str, Any]] = field(
        default_factory=list,
        metadata={"help": "The stages, each {family, component, warmup_step, every, enabled} (+ mode, keep_ratio "
                          "for a selector); see docs/pipelines.md."})
    score_batch_size: int | None = field(
        default=None, metadata={"help": "Accepted for the original's files; each stage's own preset sets its "
                                         "scoring batch (no effect here)."})

    inert: ClassVar[dict[str, str]] = {
        "save_plans": "every update's rows and every stage's decision are always recorded under the run's folder",
    }

    def check(self) -> None:
        if self.score_batch_size is not None and self.score_batch_size < 1:
            self.fail("score_batch_size", "an integer >= 1")


@register
class Pipeline(Component):
    """A ``pipelines:`` entry: its stages, checked; on :meth:`resolve` the stage presets are built and the
    stages composed (``stages``: in the order they run)."""

    kind = "pipelines"
    name = "pipeline"
    Params = PipelineParams
    summary = "a chain of selector / mixer / reorder / weighter presets (train_type: dynamic_lego)"

    def __init__(self, params: Params):
        super().__init__(params)
        key = params._component()
        self.key = key
        self.written = [s for i, raw in enumerate(params.stages) if (s := parse_stage(key, i, raw)) is not None]
        if not self.written:
            compose(key, [])  # the one-line refusal of an empty pipeline, before anything is built
        self.stages: list[Stage] = []

    @property
    def index_stages(self) -> list[Stage]:
        return [s for s in self.stages if s.index_space]

    @property
    def loss_stages(self) -> list[Stage]:
        return [s for s in self.stages if not s.index_space]

    def resolve(self, build: Callable[[str, str], Component]) -> None:
        """Build every stage's preset (``build(section, key)``: the components file's own lookup), then
        compose the stages: a mixer whose class says ``acts_on = "loss"`` is a loss-space stage."""
        for s in self.written:
            s.built = build(FAMILIES[s.family], s.component)
            s.loss_space = s.family == "mixer" and getattr(s.built, "acts_on", "rows") == "loss"
        self.stages = compose(self.key, self.written)

    def parts(self) -> list[tuple[Stage, Component]]:
        return [(s, s.built) for s in self.stages if s.built is not None]

    def check_config(self, cfg: dict[str, Any], spec: Any) -> None:
        super().check_config(cfg, spec)
        for stage, comp in self.parts():
            comp.check_config(cfg, _StageSpec(stage.component, FAMILIES[stage.family], comp.name))

    def check_data(self, train_size: int, eval_size: int | None) -> None:
        for _, comp in self.parts():
            comp.check_data(train_size, eval_size)

    def describe(self) -> str:
        index = " -> ".join(s.describe() for s in self.index_stages)
        loss = " x ".join(s.describe() for s in self.loss_stages) or "(none)"
        return f"rows: {index}; loss weights: {loss}"

    def state_dict(self) -> dict[str, Any]:
        return {}


@dataclass(frozen=True)
class _StageSpec:
    """What a component's ``check_config`` reads of its components-file entry."""

    key: str
    kind: str
    name: str

    @property
    def singular(self) -> str:
        return {v: k for k, v in FAMILIES.items()}[self.kind].replace("reorder", "reorderer")


PIPELINES = {"pipeline": Pipeline}

__all__ = ["FAMILIES", "INDEX_ORDER", "PIPELINES", "Pipeline", "PipelineParams", "Stage", "UNIFORM", "compose",
           "parse_stage"]
