"""The run plan: a training YAML resolved once into what every later stage uses.

:meth:`RunPlan.build` reads nothing but the configuration and the components file: it checks the
DataFlex keys, finds the mode in the mode table, builds the component once (its params checked
strictly) and runs every check that can be made before torchrun or a model is started - the
generic ones here, the mode's own (``check_config`` of its class), the component's own
(``check_config``). The launcher, LLaMA-Factory's workflow and the trainer then only read the plan;
a torchrun child builds its own plan once from the same YAML and overrides.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .args import DATAFLEX_KEYS, STAGES, DataFlexArguments, check_training_keys
from .component import Component
from .components import ComponentSpec, build_component, get_component, resolve_components_path
from .errors import ConfigError
from .modes import BY_TRAIN_TYPE, TRAIN_TYPES, ModeInfo
from .values import truthy

logger = logging.getLogger("dataflex")


@dataclass
class RunPlan:
    cfg: dict[str, Any]  # the checked configuration LLaMA-Factory is given
    mode: ModeInfo | None = None  # None: plain LLaMA-Factory training
    spec: ComponentSpec | None = None
    component: Component | None = None

    @property
    def train_type(self) -> str | None:
        return self.mode.train_type if self.mode is not None else None

    @property
    def cache_dir(self) -> str:
        """Where the run's records go: the component's ``cache_dir``, else ``<output_dir>/dataflex``."""
        return self.component.params.cache_dir or os.path.join(self.cfg["output_dir"], "dataflex")

    @classmethod
    def build(cls, cfg: dict[str, Any], yaml_dir: str | os.PathLike | None = None) -> "RunPlan":
        """Check the DataFlex part of a raw config and resolve it (``components_cfg_file`` made absolute).

        Raises :class:`ConfigError` with a one-line message naming the key on the first problem.
        A config without ``train_type`` is kept as it is (plain LLaMA-Factory training).
        """
        cfg = dict(cfg)
        check_training_keys(cfg)
        train_type = cfg.get("train_type")
        if train_type is None:
            stray = [k for k in DATAFLEX_KEYS if k in cfg and k != "train_type"]
            if stray:
                logger.warning("DataFlex keys %s are set but train_type is not: training plainly "
                               "(add train_type: %s)", ", ".join(stray), " | ".join(TRAIN_TYPES))
            return cls(cfg)

        keys = {k: cfg[k] for k in DATAFLEX_KEYS if k in cfg}
        DataFlexArguments(**keys).check_dataflex_args()

        stage = cfg.get("stage", "sft")
        if stage not in STAGES:
            raise ConfigError(f"stage: '{stage}' cannot be used with train_type; allowed: {', '.join(STAGES)}")
        if cfg.get("do_train") is False:
            raise ConfigError("do_train: false with train_type set; allowed: true (DataFlex changes training only)")

        mode = BY_TRAIN_TYPE[train_type]
        path = resolve_components_path(cfg.get("components_cfg_file"), yaml_dir)
        cfg["components_cfg_file"] = str(path)
        spec = get_component(path, cfg["component_name"], mode.section)
        component = build_component(spec)
        component.check_config(cfg, spec)

        mode_class = mode.mode_class()
        _check_steps(cfg, mode, component)
        mode_class.check_steps(cfg, component)
        _check_training_keys(cfg, mode, mode_class, component)
        mode_class.check_config(cfg, component, yaml_dir)
        return cls(cfg, mode, spec, component)


def _check_steps(cfg: dict[str, Any], mode: ModeInfo, component: Any) -> None:
    max_steps = cfg.get("max_steps")
    train_step = cfg.get("train_step")
    if train_step is not None and isinstance(max_steps, int) and max_steps > 0 and max_steps != train_step:
        raise ConfigError(f"train_step: {train_step} disagrees with max_steps: {max_steps}; allowed: one of them, "
                          "or the same value")
    if "warmup_steps" in cfg and "warmup_step" not in cfg:
        logger.warning("[DataFlex] warmup_steps (the learning-rate warm-up of transformers) is set but warmup_step "
                       "(DataFlex's warm-up before the %s starts) is not: it is 0, so the component starts at the "
                       "first step", mode.singular)


def _check_training_keys(cfg: dict[str, Any], mode: ModeInfo, mode_class: Any, component: Any) -> None:
    """LLaMA-Factory / transformers keys a DataFlex mode cannot serve."""
    train_type = cfg["train_type"]
    fsdp = cfg.get("fsdp")
    if (fsdp not in (None, "", [], False)) or cfg.get("fsdp_config") or \
            os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true"):
        raise ConfigError("fsdp: FSDP is not supported with train_type (scoring reads plain or DeepSpeed-partitioned "
                          "parameters); use deepspeed (examples/deepspeed/ds_z3_config.json) instead")
    if truthy(cfg.get("streaming", False)):
        raise ConfigError("streaming: true cannot be used with train_type (DataFlex needs random access to every "
                          "row); allowed: false")
    if truthy(cfg.get("auto_find_batch_size", False)):
        raise ConfigError("auto_find_batch_size: true cannot be used with train_type (it changes the global batch "
                          "the schedule and the weights are computed for); allowed: false")
    if mode_class.needs_logits(component):
        what = f"{mode.singular} '{component.name}'"
        for key in ("enable_liger_kernel", "use_liger_kernel"):
            if truthy(cfg.get(key, False)):
                raise ConfigError(f"{key}: true cannot be used with {what}: the fused loss returns no logits, and "
                                  "per-sample losses need them; allowed: false")
        for key in ("use_dft_loss", "use_eaft_loss", "use_asft_loss"):
            if truthy(cfg.get(key, False)):
                raise ConfigError(f"{key}: true cannot be combined with {what}, which defines the training loss itself; "
                                  "allowed: false")
        smoothing = cfg.get("label_smoothing_factor", 0) or 0
        if not isinstance(smoothing, (int, float)) or smoothing != 0:
            raise ConfigError(f"label_smoothing_factor: {smoothing!r} cannot be combined with {what}; allowed: 0")
    if mode_class.orders_rows:
        for key in ("disable_shuffling", "group_by_length"):
            if truthy(cfg.get(key, False)):
                logger.warning("[DataFlex] %s has no effect with train_type: %s (the schedule decides which rows each "
                               "step sees, in a seeded order)", key, train_type)
        if cfg.get("train_sampling_strategy") not in (None, "random"):
            logger.warning("[DataFlex] train_sampling_strategy has no effect with train_type: %s", train_type)
    resume = cfg.get("resume_from_checkpoint")
    if isinstance(resume, str) and resume and not os.path.isdir(resume):
        raise ConfigError(f"resume_from_checkpoint: '{resume}' is not a folder")


def plan_from_file(config: str | os.PathLike, overrides: list[str] | None = None) -> RunPlan:
    """Read a YAML plus overrides and build its plan (the YAML's folder resolves relative paths)."""
    from .args import read_config

    return RunPlan.build(read_config(config, overrides), yaml_dir=Path(config).resolve().parent)
