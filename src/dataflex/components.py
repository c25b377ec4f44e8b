"""The components YAML: where it is, what it holds, and turning an entry into a component.

Format: three optional sections, one per training mode; ``train_type`` decides which section
``component_name`` is looked up in, so the same key may exist in several sections::

    selectors:                   # train_type: dynamic_select
      loss:                      # the component_name a training YAML refers to
        name: loss               # which selector runs (or path/to/file.py:MyClass)
        params: {focus: medium}  # checked strictly against the selector's Params
    mixers:                      # train_type: dynamic_mix
      doremi: {name: doremi, params: {reference_model_path: ...}}
    weighters:                   # train_type: dynamic_weight
      loss: {name: loss, params: {strategy: linupper}}

A file without any section holds selectors at its top level (the first DataFlex format).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .component import KINDS, SINGULAR, Component, component_class
from .errors import ConfigError, parse_problem

PACKAGED_COMPONENTS = Path(__file__).resolve().parent / "configs" / "components.yaml"
# The path the original DataFlex examples use, relative to a DataFlex source checkout.
SEED_RELATIVE_PATH = Path("src/dataflex/configs/components.yaml")


@dataclass(frozen=True)
class ComponentSpec:
    key: str  # component_name
    kind: str  # "selectors" | "mixers" | "weighters"
    name: str  # `name:` in the file (a registered name, or file.py:Class)
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


def _read(path: Path) -> dict[str, Any]:
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
    return data


def load_components(path: str | os.PathLike) -> dict[str, dict[str, ComponentSpec]]:
    """``{kind: {component_name: spec}}`` for every section of the file (missing sections are empty)."""
    path = Path(path)
    data = _read(path)
    has_sections = any(isinstance(data.get(kind), dict) for kind in KINDS)
    sections = {kind: (data.get(kind) or {}) if has_sections else {} for kind in KINDS}
    if not has_sections:
        sections["selectors"] = data
    out: dict[str, dict[str, ComponentSpec]] = {}
    for kind, entries in sections.items():
        if not isinstance(entries, dict):
            raise ConfigError(f"components_cfg_file: section '{kind}' in '{path}' must be a mapping, "
                              f"got {type(entries).__name__}")
        specs: dict[str, ComponentSpec] = {}
        for key, entry in entries.items():
            if not isinstance(entry, dict) or "name" not in entry:
                continue  # not a component (e.g. an unrelated top-level key of an old sectionless file)
            error = None
            extra = sorted(set(entry) - {"name", "params"})
            params = entry.get("params") or {}
            if extra:
                error = f"component '{key}' in '{path}': unknown key '{extra[0]}'; allowed: name, params"
            elif not isinstance(params, dict):
                error = f"component '{key}' in '{path}': params must be a mapping, got {type(params).__name__}"
                params = {}
            specs[str(key)] = ComponentSpec(str(key), kind, str(entry["name"]), dict(params), path, error)
        out[kind] = specs
    return out


def get_component(path: str | os.PathLike, component_name: str, kind: str = "selectors") -> ComponentSpec:
    specs = load_components(path)[kind]
    if component_name not in specs:
        known = ", ".join(sorted(specs)) or "(none)"
        raise ConfigError(f"component_name: '{component_name}' is not in the {kind} of '{path}'; "
                          f"known {SINGULAR[kind]} components: {known}")
    spec = specs[component_name]
    if spec.error:
        raise ConfigError(spec.error)
    return spec


def build_component(spec: ComponentSpec, warn: bool = True) -> Component:
    """Instantiate the component an entry names, with strictly checked params."""
    cls = component_class(spec.kind, spec.name, spec.key, base_dir=spec.source.parent)
    return cls(cls.Params.from_dict(spec.key, spec.params, warn=warn))
