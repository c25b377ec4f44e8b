"""The components YAML: where it is, what it holds, and turning an entry into a selector.

Format (the top-level ``selectors:`` key is optional)::

    selectors:
      loss:                      # the component_name a training YAML refers to
        name: loss               # which selector runs
        params: {focus: medium}  # checked strictly against the selector's Params
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError, parse_problem

PACKAGED_COMPONENTS = Path(__file__).resolve().parent / "configs" / "components.yaml"
# The path the seeds' example YAMLs use, relative to a DataFlex source checkout.
SEED_RELATIVE_PATH = Path("src/dataflex/configs/components.yaml")


@dataclass(frozen=True)
class ComponentSpec:
    key: str  # component_name
    selector: str  # `name:` in the file
    params: dict[str, Any]
    source: Path
    error: str | None = None  # a malformed entry: reported only when it is the one chosen


def resolve_components_path(value: str | None, yaml_dir: str | os.PathLike | None = None) -> Path:
    """Find the components file named in a training YAML.

    Absolute paths are taken as they are; a relative path is tried against the working directory,
    then the training YAML's folder. Unset means the file shipped inside the package. The seeds'
    ``src/dataflex/configs/components.yaml`` also resolves to the packaged file when DataFlex is
    installed from a wheel and no such file exists relative to the working directory.
    """
    if value is None or str(value).strip() == "":
        return PACKAGED_COMPONENTS
    path = Path(os.path.expanduser(str(value)))
    candidates = [path] if path.is_absolute() else [Path.cwd() / path] + ([Path(yaml_dir) / path] if yaml_dir else [])
    for cand in candidates:
        if cand.is_file():
            return cand.resolve()
    if not path.is_absolute() and path.as_posix().endswith(SEED_RELATIVE_PATH.as_posix()):
        return PACKAGED_COMPONENTS
    tried = ", ".join(str(c) for c in candidates)
    raise ConfigError(f"components_cfg_file: '{value}' not found (tried {tried})")


def load_components(path: str | os.PathLike) -> dict[str, ComponentSpec]:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise ConfigError(f"components_cfg_file: cannot read '{path}': {err.strerror or err}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"components_cfg_file: '{path}' is not valid YAML{parse_problem(err)}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"components_cfg_file: '{path}' must hold a mapping of components, got {type(data).__name__}")
    entries = data["selectors"] if isinstance(data.get("selectors"), dict) else data

    specs: dict[str, ComponentSpec] = {}
    for key, entry in entries.items():
        if not isinstance(entry, dict) or "name" not in entry:
            # other sections of a larger components file (e.g. mixers) are not selectors: skip them
            continue
        error = None
        extra = sorted(set(entry) - {"name", "params"})
        params = entry.get("params") or {}
        if extra:
            error = f"component '{key}' in '{path}': unknown key '{extra[0]}'; allowed: name, params"
        elif not isinstance(params, dict):
            error = f"component '{key}' in '{path}': params must be a mapping, got {type(params).__name__}"
            params = {}
        specs[str(key)] = ComponentSpec(str(key), str(entry["name"]), dict(params), path, error)
    return specs


def get_component(path: str | os.PathLike, component_name: str) -> ComponentSpec:
    specs = load_components(path)
    if component_name not in specs:
        known = ", ".join(sorted(specs)) or "(none)"
        raise ConfigError(f"component_name: '{component_name}' is not in '{path}'; known components: {known}")
    spec = specs[component_name]
    if spec.error:
        raise ConfigError(spec.error)
    return spec


def build_selector(spec: ComponentSpec):
    """Instantiate the selector an entry names, with strictly checked params."""
    from .selectors import get_selector_class

    cls = get_selector_class(spec.selector, spec.key)
    return cls(cls.Params.from_dict(spec.key, spec.params))
