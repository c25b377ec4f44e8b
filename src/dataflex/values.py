"""Values of a training YAML that several stages read: comma lists, booleans, mixture proportions."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from .errors import ConfigError

# a weighting run whose weights all lie within a band this wide (around their mean 1) weighted the loss almost as
# plain training does: the run warns at its end and its report says so
NEAR_UNIFORM_WEIGHTS = 0.02


def names(value: Any) -> list[str]:
    if value is None or value == "":
        return []
    if isinstance(value, (list, tuple)):
        return [str(v).strip() for v in value]
    return [n.strip() for n in str(value).split(",") if n.strip()]


def truthy(value: Any) -> bool:
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
