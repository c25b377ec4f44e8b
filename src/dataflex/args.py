"""DataFlex's keys in a LLaMA-Factory YAML, and the checks made before any model is loaded.

The dataclass below is merged into LLaMA-Factory's ``FinetuningArguments`` (see
:mod:`dataflex.integration`), so the keys go through LLaMA-Factory's own parser: unknown keys
stay an error, and ``--help`` lists them. :func:`validate_config` runs the checks that need the
whole configuration (components file, selector params, eval set) on the raw YAML first, so a
mistake fails in the first second with one line, before torchrun or a model is started.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from .errors import ConfigError, parse_problem

TRAIN_TYPES = ("dynamic_select",)
STAGES = ("sft",)
DATAFLEX_KEYS = ("train_type", "components_cfg_file", "component_name", "warmup_step", "update_step", "update_times")


@dataclass
class DataFlexArguments:
    train_type: Optional[str] = field(
        default=None,
        metadata={"help": "Set to `dynamic_select` to train on samples chosen by a selector; unset = plain LLaMA-Factory."},
    )
    components_cfg_file: Optional[str] = field(
        default=None,
        metadata={"help": "Components YAML (absolute, or relative to the working dir, then to the YAML's folder). "
                  "Unset: the file shipped with DataFlex."},
    )
    component_name: Optional[str] = field(
        default=None, metadata={"help": "Key of the component (selector + params) in the components file."}
    )
    warmup_step: int = field(
        default=0, metadata={"help": "Optimizer steps on a random draw at the start of every cycle."}
    )
    update_step: Optional[int] = field(
        default=None, metadata={"help": "Optimizer steps trained on each selection."}
    )
    update_times: Optional[int] = field(
        default=None, metadata={"help": "Selections per cycle. Total steps = warmup_step + update_step x update_times."}
    )

    def check_dataflex_args(self) -> None:
        """Checks that need only these keys (also run inside LLaMA-Factory's parser)."""
        if self.train_type is None:
            return
        if self.train_type not in TRAIN_TYPES:
            raise ConfigError(f"train_type: '{self.train_type}' is not supported; allowed: {', '.join(TRAIN_TYPES)}")
        if not self.component_name:
            raise ConfigError("component_name: required when train_type is set (e.g. component_name: random)")
        for key in ("update_step", "update_times"):
            if getattr(self, key) is None:
                raise ConfigError(f"{key}: required when train_type is set (an integer >= 0)")
        for key in ("warmup_step", "update_step", "update_times"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ConfigError(f"{key}: {value!r} is invalid; allowed: an integer >= 0")
        if self.update_step == 0 and self.update_times > 0:
            raise ConfigError(f"update_step: 0 is invalid with update_times = {self.update_times}; allowed: >= 1")
        if self.warmup_step + self.update_step * self.update_times == 0:
            raise ConfigError("warmup_step/update_step/update_times: the schedule has no steps; "
                              "set warmup_step >= 1 or update_step, update_times >= 1")


def read_config(config: str | os.PathLike, overrides: list[str] | None = None) -> dict[str, Any]:
    """Read a YAML/JSON config plus ``key=value`` overrides the way ``llamafactory-cli`` does."""
    import json

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


def validate_config(cfg: dict[str, Any], yaml_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    """Check the DataFlex part of a raw config; return it with ``components_cfg_file`` resolved.

    Raises :class:`ConfigError` with a one-line message naming the key on the first problem.
    A config without ``train_type`` is returned unchanged (plain LLaMA-Factory training).
    """
    from .components import build_selector, get_component, resolve_components_path

    cfg = dict(cfg)
    if cfg.get("train_type") is None:
        stray = [k for k in DATAFLEX_KEYS if k in cfg and k != "train_type"]
        if stray:
            logging.getLogger("dataflex").warning(
                "DataFlex keys %s are set but train_type is not: training plainly, without selection "
                "(add train_type: dynamic_select to select)", ", ".join(stray))
        return cfg

    keys = {k: cfg[k] for k in DATAFLEX_KEYS if k in cfg}
    DataFlexArguments(**keys).check_dataflex_args()

    stage = cfg.get("stage", "sft")
    if stage not in STAGES:
        raise ConfigError(f"stage: '{stage}' cannot be used with train_type; allowed: {', '.join(STAGES)}")

    path = resolve_components_path(cfg.get("components_cfg_file"), yaml_dir)
    cfg["components_cfg_file"] = str(path)
    spec = get_component(path, cfg["component_name"])
    selector = build_selector(spec)

    if selector.needs_eval and not cfg.get("eval_dataset"):
        raise ConfigError(f"eval_dataset: required by selector '{spec.selector}' (component '{spec.key}'); "
                          "name a registered dataset of the target task")
    ft = cfg.get("finetuning_type", "lora")
    if selector.supported_finetuning is not None and ft not in selector.supported_finetuning:
        raise ConfigError(f"finetuning_type: '{ft}' is not supported by selector '{spec.selector}'; "
                          f"supported: {', '.join(selector.supported_finetuning)}")
    return cfg
