"""DataFlex's keys in a LLaMA-Factory YAML, and reading a YAML with its overrides.

The dataclass below is merged into LLaMA-Factory's ``FinetuningArguments`` (see
:mod:`dataflex.integration`), so the keys go through LLaMA-Factory's own parser: unknown keys
stay an error, and ``--help`` lists them. The checks that need the whole configuration run once,
when the run plan is built (:mod:`dataflex.plan`).
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from .errors import ConfigError, parse_problem
from .modes import BY_TRAIN_TYPE, TRAIN_TYPES

logger = logging.getLogger("dataflex")

STAGES = ("sft", "pt")
SAMPLE_RULES = ("mixture", "stratified", "uniform")
DATAFLEX_KEYS = ("train_type", "components_cfg_file", "component_name", "warmup_step", "update_step", "update_times",
                 "train_step", "mixture_sample_rule", "init_mixture_proportions", "static_mix", "mixer_eval_dataset",
                 "freeze_gate")
# Keys DataFlex adds that serve plain training as well (they mean the same with or without train_type).
TRAINING_KEYS = ("early_stopping_min_delta",)


@dataclass
class DataFlexArguments:
    train_type: Optional[str] = field(
        default=None,
        metadata={"help": "The DataFlex mode, one of: " + ", ".join(f"{m.train_type} (a {m.singular})" for m in
                                                                       BY_TRAIN_TYPE.values())
                          + "; unset = plain LLaMA-Factory."},
    )
    components_cfg_file: Optional[str] = field(
        default=None,
        metadata={"help": "Components YAML (absolute, or relative to the working dir, then to the YAML's folder). "
                  "Unset: the file shipped with DataFlex."},
    )
    component_name: Optional[str] = field(
        default=None, metadata={"help": "Key of the component in the components file's section for train_type."}
    )
    warmup_step: int = field(
        default=0, metadata={"help": "Optimizer steps before the component starts (until then: random rows, the "
                                     "initial proportions, weights 1 or a random order)."}
    )
    update_step: Optional[int] = field(
        default=None, metadata={"help": "Optimizer steps between two decisions (a selector, a mixer, a dynamic "
                                        "reorderer)."}
    )
    update_times: Optional[int] = field(
        default=None, metadata={"help": "Decisions per cycle (a selector) or in all (a mixer, a reorderer); -1: until "
                                        "training ends (a reorderer: also when unset)."}
    )
    train_step: Optional[int] = field(
        default=None, metadata={"help": "Total optimizer steps (like max_steps; overrides num_train_epochs)."}
    )
    mixture_sample_rule: Optional[str] = field(
        default=None, metadata={"help": "With a mixer: mixture (the mixer's proportions, from init_mixture_proportions; "
                                        "default), stratified (fixed, by dataset size) or uniform (fixed, equal)."}
    )
    init_mixture_proportions: Optional[list[float]] = field(
        default=None, metadata={"help": "With a mixer: starting proportions, one per dataset (summing to 1), or the "
                                        "path of a weights JSON written by DoReMi step 2. Unset: uniform."}
    )
    static_mix: bool = field(
        default=False, metadata={"help": "With a mixer: keep the initial proportions for the whole run (no mixer update)."}
    )
    mixer_eval_dataset: Optional[str] = field(
        default=None, metadata={"help": "With a mixer: one eval dataset per training dataset, in the same order "
                                        "(a mixer that measures the model reads them)."}
    )
    freeze_gate: bool = field(
        default=False, metadata={"help": "With a mixer and a mixture-of-experts model: do not train the routers."}
    )
    early_stopping_min_delta: float = field(
        default=0.0, metadata={"help": "With early_stopping_steps: an eval that improves metric_for_best_model by this "
                                       "much or less counts as no improvement (transformers' "
                                       "early_stopping_threshold). 0: any improvement counts."}
    )

    def check_dataflex_args(self) -> None:
        """Checks that need only these keys (also run inside LLaMA-Factory's parser)."""
        check_min_delta(self.early_stopping_min_delta)
        if self.train_type is None:
            return
        if self.train_type not in TRAIN_TYPES:
            raise ConfigError(f"train_type: '{self.train_type}' is not supported; allowed: {', '.join(TRAIN_TYPES)}")
        if not self.component_name:
            raise ConfigError("component_name: required when train_type is set (e.g. component_name: random)")
        _integer("warmup_step", self.warmup_step, 0)
        for key, low in (("update_step", 0), ("update_times", -1), ("train_step", 1)):
            if getattr(self, key) is not None:
                _integer(key, getattr(self, key), low)
        if self.update_step == 0 and (self.update_times or 0) != 0:
            raise ConfigError(f"update_step: 0 is invalid with update_times = {self.update_times}; allowed: >= 1")
        BY_TRAIN_TYPE[self.train_type].mode_class().check_args(self)  # the mode's own reading of these keys
        if self.mixture_sample_rule is not None and self.mixture_sample_rule not in SAMPLE_RULES:
            raise ConfigError(f"mixture_sample_rule: '{self.mixture_sample_rule}' is not supported; "
                              f"allowed: {', '.join(SAMPLE_RULES)}")
        for key in ("static_mix", "freeze_gate"):
            if not isinstance(getattr(self, key), bool):
                raise ConfigError(f"{key}: {getattr(self, key)!r} is invalid; allowed: true or false")


def check_min_delta(value: Any) -> None:
    """``early_stopping_min_delta`` is a finite number >= 0 (not a boolean or a string)."""
    if (not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value)
            or value < 0):
        hint = ""
        if isinstance(value, str):
            try:
                hint = f" (YAML reads {value} as a string; write {float(value)!r})"
            except ValueError:
                pass
        raise ConfigError(f"early_stopping_min_delta: {value!r} is invalid; allowed: a number >= 0 (e.g. 0.01){hint}")


def check_training_keys(cfg: dict[str, Any]) -> None:
    """The :data:`TRAINING_KEYS` of a config, with or without ``train_type``."""
    if "early_stopping_min_delta" in cfg:
        check_min_delta(cfg["early_stopping_min_delta"])
        if cfg["early_stopping_min_delta"] > 0 and cfg.get("early_stopping_steps") is None:
            logger.warning("[DataFlex] early_stopping_min_delta has no effect without early_stopping_steps "
                           "(early stopping is off)")


def _integer(key: str, value: Any, low: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ConfigError(f"{key}: {value!r} is invalid; allowed: an integer >= {low}")


def read_config(config: str | os.PathLike, overrides: list[str] | None = None) -> dict[str, Any]:
    """Read a YAML/JSON config plus ``key=value`` overrides the way ``llamafactory-cli`` does."""
    import yaml
    from omegaconf import OmegaConf

    path = Path(config)
    if not path.is_file():
        raise ConfigError(f"config file '{config}' not found")
    try:
        text = path.read_text(encoding="utf-8")
        base = yaml.safe_load(text) if path.suffix in (".yaml", ".yml") else json.loads(text)
    except (yaml.YAMLError, ValueError, OSError) as err:
        raise ConfigError(f"config file '{config}' is not valid YAML/JSON{parse_problem(err)}") from None
    if base is None:
        base = {}
    if not isinstance(base, dict):
        raise ConfigError(f"config file '{config}' must hold a mapping of keys to values, got {type(base).__name__}")
    try:
        merged = OmegaConf.merge(OmegaConf.create(base), OmegaConf.from_cli(list(overrides or [])))
        data = OmegaConf.to_container(merged)
    except Exception as err:  # noqa: BLE001 - OmegaConf raises several types for a bad override
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(f"command-line overrides {list(overrides or [])} could not be applied: {first}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file '{config}' must hold a mapping of keys to values")
    return data
