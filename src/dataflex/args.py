"""DataFlex's keys in a LLaMA-Factory YAML, and every check that can be made before training starts.

The dataclass below is merged into LLaMA-Factory's ``FinetuningArguments`` (see
:mod:`dataflex.integration`), so the keys go through LLaMA-Factory's own parser: unknown keys
stay an error, and ``--help`` lists them. :func:`validate_config` runs the checks that need the
whole configuration (components file, component params, datasets, keys of LLaMA-Factory that a
DataFlex mode cannot serve) on the raw YAML first, so a mistake fails in the first seconds with
one line naming the key, before torchrun or a model is started.
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

logger = logging.getLogger("dataflex")

TRAIN_TYPES = ("dynamic_select", "dynamic_mix", "dynamic_weight")
STAGES = ("sft", "pt")
SAMPLE_RULES = ("mixture", "stratified", "uniform")
DATAFLEX_KEYS = ("train_type", "components_cfg_file", "component_name", "warmup_step", "update_step", "update_times",
                 "train_step", "mixture_sample_rule", "init_mixture_proportions", "static_mix", "mixer_eval_dataset",
                 "freeze_gate")


@dataclass
class DataFlexArguments:
    train_type: Optional[str] = field(
        default=None,
        metadata={"help": "dynamic_select (a selector picks the rows), dynamic_mix (a mixer sets the datasets' "
                          "proportions) or dynamic_weight (a weighter weights each sample's loss); "
                          "unset = plain LLaMA-Factory."},
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
        default=0, metadata={"help": "Optimizer steps before the component starts: random rows (select), the initial "
                                     "proportions (mix), weights 1 (weight)."}
    )
    update_step: Optional[int] = field(
        default=None, metadata={"help": "Optimizer steps between two decisions (select, mix)."}
    )
    update_times: Optional[int] = field(
        default=None, metadata={"help": "Decisions per cycle (select) or in all (mix); -1: until training ends."}
    )
    train_step: Optional[int] = field(
        default=None, metadata={"help": "Total optimizer steps (like max_steps; overrides num_train_epochs)."}
    )
    mixture_sample_rule: Optional[str] = field(
        default=None, metadata={"help": "dynamic_mix: mixture (the mixer's proportions, from init_mixture_proportions; "
                                        "default), stratified (fixed, by dataset size) or uniform (fixed, equal)."}
    )
    init_mixture_proportions: Optional[list[float]] = field(
        default=None, metadata={"help": "dynamic_mix: starting proportions, one per dataset (summing to 1), or the "
                                        "path of a weights JSON written by DoReMi step 2. Unset: uniform."}
    )
    static_mix: bool = field(
        default=False, metadata={"help": "dynamic_mix: keep the initial proportions for the whole run (no mixer update)."}
    )
    mixer_eval_dataset: Optional[str] = field(
        default=None, metadata={"help": "dynamic_mix: one eval dataset per training dataset, in the same order "
                                        "(dynamic_moe measures the model on them)."}
    )
    freeze_gate: bool = field(
        default=False, metadata={"help": "dynamic_mix with a mixture-of-experts model: do not train the routers."}
    )

    def check_dataflex_args(self) -> None:
        """Checks that need only these keys (also run inside LLaMA-Factory's parser)."""
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
        if self.train_type == "dynamic_select":
            for key in ("update_step", "update_times"):
                if getattr(self, key) is None:
                    raise ConfigError(f"{key}: required with train_type: dynamic_select (an integer)")
        if self.update_step == 0 and (self.update_times or 0) != 0:
            raise ConfigError(f"update_step: 0 is invalid with update_times = {self.update_times}; allowed: >= 1")
        if (self.train_type == "dynamic_select" and self.update_times >= 0
                and self.warmup_step + self.update_step * self.update_times == 0):
            raise ConfigError("warmup_step/update_step/update_times: the schedule has no steps; "
                              "set warmup_step >= 1 or update_step, update_times >= 1")
        if self.mixture_sample_rule is not None and self.mixture_sample_rule not in SAMPLE_RULES:
            raise ConfigError(f"mixture_sample_rule: '{self.mixture_sample_rule}' is not supported; "
                              f"allowed: {', '.join(SAMPLE_RULES)}")
        for key in ("static_mix", "freeze_gate"):
            if not isinstance(getattr(self, key), bool):
                raise ConfigError(f"{key}: {getattr(self, key)!r} is invalid; allowed: true or false")


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


def names(value: Any) -> list[str]:
    if value is None or value == "":
        return []
    if isinstance(value, (list, tuple)):
        return [str(v).strip() for v in value]
    return [n.strip() for n in str(value).split(",") if n.strip()]


def _truthy(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() not in ("", "false", "0", "no", "none", "null")
    return bool(value)


def read_proportions(value: Any, domains: list[str], yaml_dir: str | os.PathLike | None = None) -> list[float]:
    """``init_mixture_proportions`` as one number per domain (a list, or a weights JSON of DoReMi step 2)."""
    key = "init_mixture_proportions"
    if isinstance(value, str):
        path = Path(os.path.expanduser(value))
        if not path.is_absolute() and not path.is_file() and yaml_dir is not None and (Path(yaml_dir) / path).is_file():
            path = Path(yaml_dir) / path
        if not path.is_file():
            raise ConfigError(f"{key}: '{value}' is neither a list of proportions nor an existing weights JSON")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise ConfigError(f"{key}: '{value}' is not valid JSON ({err})") from None
        mapping = data.get("domain_weights") if isinstance(data, dict) else None
        if isinstance(mapping, dict):
            missing = [d for d in domains if d not in mapping]
            if missing:
                raise ConfigError(f"{key}: '{value}' has weights for {', '.join(mapping)} but not for dataset "
                                  f"'{missing[0]}'; allowed: a weights file whose domains are the datasets of "
                                  f"dataset ({', '.join(domains)})")
            props = [float(mapping[d]) for d in domains]
        elif isinstance(data, dict) and isinstance(data.get("weights"), list):
            props = [float(x) for x in data["weights"]]
        elif isinstance(data, list):
            props = [float(x) for x in data]
        else:
            raise ConfigError(f"{key}: '{value}' holds no 'domain_weights' mapping or 'weights' list")
        total = sum(props)
        if total <= 0 or any(p < 0 for p in props):
            raise ConfigError(f"{key}: '{value}' holds weights that are negative or all 0")
        props = [p / total for p in props]  # written by DoReMi: normalise float rounding away
    elif isinstance(value, (list, tuple)):
        try:
            props = [float(x) for x in value]
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: {list(value)!r} is invalid; allowed: one number per dataset") from None
        if any(not math.isfinite(p) or p < 0 for p in props):
            raise ConfigError(f"{key}: {list(value)!r} is invalid; allowed: numbers >= 0")
        if abs(sum(props) - 1.0) > 1e-6:
            raise ConfigError(f"{key}: {list(value)!r} sums to {sum(props):.6g}; allowed: proportions summing to 1 "
                              "(within 1e-6)")
    else:
        raise ConfigError(f"{key}: {value!r} is invalid; allowed: a list of proportions or a weights JSON path")
    if len(props) != len(domains):
        raise ConfigError(f"{key}: {len(props)} proportions for {len(domains)} datasets in dataset "
                          f"({', '.join(domains)}); allowed: one per dataset")
    return props


def validate_config(cfg: dict[str, Any], yaml_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    """Check the DataFlex part of a raw config; return it with ``components_cfg_file`` resolved.

    Raises :class:`ConfigError` with a one-line message naming the key on the first problem.
    A config without ``train_type`` is returned unchanged (plain LLaMA-Factory training).
    """
    from .component import KIND_OF_TRAIN_TYPE
    from .components import build_component, get_component, resolve_components_path

    cfg = dict(cfg)
    train_type = cfg.get("train_type")
    if train_type is None:
        stray = [k for k in DATAFLEX_KEYS if k in cfg and k != "train_type"]
        if stray:
            logger.warning("DataFlex keys %s are set but train_type is not: training plainly "
                           "(add train_type: dynamic_select, dynamic_mix or dynamic_weight)", ", ".join(stray))
        return cfg

    keys = {k: cfg[k] for k in DATAFLEX_KEYS if k in cfg}
    DataFlexArguments(**keys).check_dataflex_args()

    stage = cfg.get("stage", "sft")
    if stage not in STAGES:
        raise ConfigError(f"stage: '{stage}' cannot be used with train_type; allowed: {', '.join(STAGES)}")
    if cfg.get("do_train") is False:
        raise ConfigError("do_train: false with train_type set; allowed: true (DataFlex changes training only)")

    path = resolve_components_path(cfg.get("components_cfg_file"), yaml_dir)
    cfg["components_cfg_file"] = str(path)
    kind = KIND_OF_TRAIN_TYPE[train_type]
    spec = get_component(path, cfg["component_name"], kind)
    component = build_component(spec)

    if component.needs_eval and not cfg.get("eval_dataset"):
        raise ConfigError(f"eval_dataset: required by {kind[:-1]} '{spec.name}' (component '{spec.key}'); "
                          "name a registered dataset of the target task")
    ft = cfg.get("finetuning_type", "lora")
    if component.supported_finetuning is not None and ft not in component.supported_finetuning:
        raise ConfigError(f"finetuning_type: '{ft}' is not supported by {kind[:-1]} '{spec.name}'; "
                          f"supported: {', '.join(component.supported_finetuning)}")

    _check_steps(cfg, train_type, component)
    _check_training_keys(cfg, train_type, component)
    if train_type == "dynamic_mix":
        _check_mixing(cfg, component, yaml_dir)
    return cfg


def _check_steps(cfg: dict[str, Any], train_type: str, component: Any) -> None:
    max_steps = cfg.get("max_steps")
    train_step = cfg.get("train_step")
    if train_step is not None and isinstance(max_steps, int) and max_steps > 0 and max_steps != train_step:
        raise ConfigError(f"train_step: {train_step} disagrees with max_steps: {max_steps}; allowed: one of them, "
                          "or the same value")
    if "warmup_steps" in cfg and "warmup_step" not in cfg:
        logger.warning("[DataFlex] warmup_steps (the learning-rate warm-up of transformers) is set but warmup_step "
                       "(DataFlex's warm-up before the %s starts) is not: it is 0, so the component starts at the "
                       "first step", component.kind[:-1])
    if train_type == "dynamic_weight":
        ignored = [k for k in ("update_step", "update_times") if cfg.get(k) is not None]
        if ignored:
            logger.warning("[DataFlex] %s: ignored with train_type: dynamic_weight (weights are computed at every "
                           "step after warmup_step)", ", ".join(ignored))
    if train_type == "dynamic_mix":
        static = _truthy(cfg.get("static_mix", False))
        if getattr(component, "every_step", False):
            if cfg.get("update_step") not in (None, 1) or cfg.get("update_times") not in (None, -1):
                logger.warning("[DataFlex] mixer '%s' updates after every optimizer step: update_step and update_times "
                               "are ignored", component.name)
        elif not static:
            for key in ("update_step", "update_times"):
                if cfg.get(key) is None:
                    raise ConfigError(f"{key}: required with train_type: dynamic_mix unless static_mix is true "
                                      "(an integer; update_times -1: until the end)")


def _check_training_keys(cfg: dict[str, Any], train_type: str, component: Any) -> None:
    """LLaMA-Factory / transformers keys a DataFlex mode cannot serve."""
    fsdp = cfg.get("fsdp")
    if (fsdp not in (None, "", [], False)) or cfg.get("fsdp_config") or \
            os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true"):
        raise ConfigError("fsdp: FSDP is not supported with train_type (scoring reads plain or DeepSpeed-partitioned "
                          "parameters); use deepspeed (examples/deepspeed/ds_z3_config.json) instead")
    if _truthy(cfg.get("streaming", False)):
        raise ConfigError("streaming: true cannot be used with train_type (DataFlex needs random access to every "
                          "row); allowed: false")
    if _truthy(cfg.get("auto_find_batch_size", False)):
        raise ConfigError("auto_find_batch_size: true cannot be used with train_type (it changes the global batch "
                          "the schedule and the weights are computed for); allowed: false")
    needs_logits = train_type == "dynamic_weight" or (
        train_type == "dynamic_mix" and bool(getattr(component, "needs", frozenset()) & {"losses", "excess"}))
    if needs_logits:
        what = f"{component.kind[:-1]} '{component.name}'"
        for key in ("enable_liger_kernel", "use_liger_kernel"):
            if _truthy(cfg.get(key, False)):
                raise ConfigError(f"{key}: true cannot be used with {what}: the fused loss returns no logits, and "
                                  "per-sample losses need them; allowed: false")
        for key in ("use_dft_loss", "use_eaft_loss", "use_asft_loss"):
            if _truthy(cfg.get(key, False)):
                raise ConfigError(f"{key}: true cannot be combined with {what}, which defines the training loss itself; "
                                  "allowed: false")
        smoothing = cfg.get("label_smoothing_factor", 0) or 0
        if not isinstance(smoothing, (int, float)) or smoothing != 0:
            raise ConfigError(f"label_smoothing_factor: {smoothing!r} cannot be combined with {what}; allowed: 0")
    if train_type in ("dynamic_select", "dynamic_mix"):
        for key in ("disable_shuffling", "group_by_length"):
            if _truthy(cfg.get(key, False)):
                logger.warning("[DataFlex] %s has no effect with train_type: %s (the schedule decides which rows each "
                               "step sees, in a seeded order)", key, train_type)
        if cfg.get("train_sampling_strategy") not in (None, "random"):
            logger.warning("[DataFlex] train_sampling_strategy has no effect with train_type: %s", train_type)
    resume = cfg.get("resume_from_checkpoint")
    if isinstance(resume, str) and resume and not os.path.isdir(resume):
        raise ConfigError(f"resume_from_checkpoint: '{resume}' is not a folder")


def _check_mixing(cfg: dict[str, Any], mixer: Any, yaml_dir: str | os.PathLike | None) -> None:
    domains = names(cfg.get("dataset"))
    if not domains:
        raise ConfigError("dataset: dynamic_mix needs the training datasets (the domains), e.g. dataset: a,b")
    if len(set(domains)) != len(domains):
        raise ConfigError(f"dataset: {', '.join(domains)} names a dataset twice; allowed: each domain once")
    if cfg.get("mix_strategy", "concat") != "concat":
        raise ConfigError(f"mix_strategy: '{cfg['mix_strategy']}' cannot be used with dynamic_mix (the mixer draws "
                          "from each dataset itself); allowed: concat")
    if (cfg.get("val_size") or 0) > 0:
        raise ConfigError("val_size: cannot be used with dynamic_mix (rows of one domain would be split off as eval); "
                          "name an eval_dataset instead")
    if cfg.get("tokenized_path"):
        raise ConfigError("tokenized_path: cannot be used with dynamic_mix (a pre-tokenized set does not say which "
                          "row comes from which domain)")
    if cfg.get("init_mixture_proportions") is not None:
        props = read_proportions(cfg["init_mixture_proportions"], domains, yaml_dir)
        cfg["init_mixture_proportions"] = props
    if getattr(mixer, "name", None) == "dynamic_moe" or "router" in getattr(mixer, "needs", frozenset()):
        evals = names(cfg.get("mixer_eval_dataset"))
        if len(evals) != len(domains):
            raise ConfigError(f"mixer_eval_dataset: mixer '{mixer.name}' needs one eval dataset per training dataset "
                              f"({len(domains)}: {', '.join(domains)}), got {len(evals)}")
    elif cfg.get("mixer_eval_dataset"):
        logger.warning("[DataFlex] mixer_eval_dataset is only used by mixers that measure the model per domain "
                       "(dynamic_moe); mixer '%s' ignores it", mixer.name)
    if len(domains) == 1:
        logger.warning("[DataFlex] dynamic_mix with one dataset (%s): there is nothing to mix", domains[0])
