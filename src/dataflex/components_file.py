"""The components YAML: where it is, what it holds, and turning an entry into a component.

Format: four optional sections, one per training mode; ``train_type`` decides which section
``component_name`` is looked up in, so the same key may exist in several sections::

    selectors:                   # train_type: dynamic_select
      loss:                      # the component_name a training YAML refers to
        name: loss               # which selector runs (or path/to/file.py:MyClass)
        params: {focus: medium}  # checked strictly against the selector's Params
    mixers:                      # train_type: dynamic_mix
      doremi: {name: doremi, params: {reference_model_path: ...}}
    weighters:                   # train_type: dynamic_weight
      loss: {name: loss, params: {strategy: linupper}}
    reorderers:                  # train_type: dynamic_reorder (also read under its other name, `reorders:`)
      by_length: {name: static, params: {score: length, order: ascending}}
    pipelines:                   # train_type: dynamic_lego (stages name presets of the sections above)
      select_then_reorder: {name: select_then_reorder, params: {stages: [...]}}

A file without any section holds selectors at its top level (the first DataFlex format).
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .component import REGISTRY, Component
from .errors import ConfigError, parse_problem
from .modes import BY_SECTION, SECTIONS

logger = logging.getLogger("dataflex")

# Other names of a section: the original DataFlex calls its reorderers `reorders:`.
SECTION_ALIASES = {"reorders": "reorderers"}
PACKAGED_COMPONENTS = Path(__file__).resolve().parent / "configs" / "components.yaml"
# The path the original DataFlex examples use, relative to a DataFlex source checkout.
SEED_RELATIVE_PATH = Path("src/dataflex/configs/components.yaml")


@dataclass(frozen=True)
class ComponentSpec:
    key: str  # component_name
    kind: str  # the section it was found in ("selectors", ...)
    name: str  # `name:` in the file (a registered name, or file.py:Class)
    params: dict[str, Any]
    source: Path
    error: str | None = None  # a malformed entry: reported only when it is the one chosen

    @property
    def singular(self) -> str:
        """One component of its section, in messages ("selector")."""
        return BY_SECTION[self.kind].singular


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
    for alias, kind in SECTION_ALIASES.items():
        if alias not in data or (isinstance(data[alias], dict) and "name" in data[alias]):
            continue  # absent, or a selector of that name in a file without sections
        extra = data.pop(alias)
        if not isinstance(extra, dict):
            raise ConfigError(f"components_cfg_file: section '{alias}' in '{path}' must be a mapping, "
                              f"got {type(extra).__name__}")
        mine = data.get(kind) or {}
        both = sorted(set(mine) & set(extra)) if isinstance(mine, dict) else []
        if both:
            raise ConfigError(f"components_cfg_file: component '{both[0]}' is in both '{kind}' and '{alias}' of "
                              f"'{path}' (the same section under two names); allowed: one entry per name")
        data[kind] = {**mine, **extra} if isinstance(mine, dict) else mine
    has_sections = any(isinstance(data.get(kind), dict) for kind in SECTIONS)
    sections = {kind: (data.get(kind) or {}) if has_sections else {} for kind in SECTIONS}
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
                          f"known {BY_SECTION[kind].singular} components: {known}")
    spec = specs[component_name]
    if spec.error:
        raise ConfigError(spec.error)
    return spec


def build_component(spec: ComponentSpec, warn: bool = True) -> Component:
    """Instantiate the component an entry names, with strictly checked params."""
    cls = component_class(spec.kind, spec.name, spec.key, base_dir=spec.source.parent)
    component = cls(cls.Params.from_dict(spec.key, spec.params, warn=warn))
    resolve = getattr(component, "resolve", None)
    if resolve is not None:  # a component made of others (a pipeline): its parts come from the same file

        def build(kind: str, key: str) -> Component:
            try:
                return build_component(get_component(spec.source, key, kind), warn=warn)
            except ConfigError as err:
                raise ConfigError(f"pipeline '{spec.key}': {BY_SECTION[kind].singular} stage '{key}': {err}") from None

        resolve(build)
    return component


def available(kind: str) -> dict[str, type[Component]]:
    """The built-in components of a section, by name (importing the package registers them)."""
    BY_SECTION[kind].package()
    return REGISTRY.get(kind, {})


def _user_class(spec: str, kind: str, component: str, base_dir: Path | None) -> type[Component]:
    """Load ``path/to/file.py:Class`` or ``package.module:Class`` (a user's own component)."""
    where, _, cls_name = spec.rpartition(":")
    if not where or not cls_name:
        raise ConfigError(f"component '{component}': name '{spec}' must be 'file.py:Class' or 'package.module:Class'")
    try:
        if where.endswith(".py") or "/" in where or os.sep in where:
            path = Path(os.path.expanduser(where))
            candidates = [path] if path.is_absolute() else [Path.cwd() / path] + ([base_dir / path] if base_dir else [])
            found = next((c for c in candidates if c.is_file()), None)
            if found is None:
                tried = ", ".join(str(c) for c in candidates)
                raise ConfigError(f"component '{component}': file '{where}' not found (tried {tried})")
            mod_name = f"dataflex_user_{abs(hash(str(found.resolve())))}"
            module = sys.modules.get(mod_name)
            if module is None:
                loader_spec = importlib.util.spec_from_file_location(mod_name, found)
                module = importlib.util.module_from_spec(loader_spec)
                sys.modules[mod_name] = module
                try:
                    loader_spec.loader.exec_module(module)
                except BaseException:
                    sys.modules.pop(mod_name, None)
                    raise
        else:
            module = importlib.import_module(where)
    except ConfigError:
        raise
    except Exception as err:  # noqa: BLE001 - the user's code: show where it broke, once, then one line
        logger.error("[DataFlex] loading component '%s' from '%s' failed:\n%s", component, where,
                     traceback.format_exc())
        raise ConfigError(f"component '{component}': loading '{where}' failed: {type(err).__name__}: {err}") from None
    cls = getattr(module, cls_name, None)
    if cls is None:
        raise ConfigError(f"component '{component}': '{where}' has no class '{cls_name}'")
    base = BY_SECTION[kind].base_class()
    if not (isinstance(cls, type) and issubclass(cls, base)):
        raise ConfigError(f"component '{component}': '{spec}' is not a subclass of dataflex {base.__name__}")
    return cls


def component_class(kind: str, name: str, component: str, base_dir: Path | None = None) -> type[Component]:
    """The class a components-file entry names, for ``kind``; a ``:`` in the name loads a user's class."""
    if ":" in name:
        return _user_class(name, kind, component, base_dir)
    if BY_SECTION[kind].any_name:  # `name:` is a label; every entry is the section's one class
        return BY_SECTION[kind].base_class()
    known = available(kind)
    if name not in known:
        raise ConfigError(f"component '{component}': unknown {BY_SECTION[kind].singular} name '{name}'; "
                          f"available: {', '.join(sorted(known))} (or 'file.py:Class' for your own)")
    return known[name]
