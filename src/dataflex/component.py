"""What selectors, mixers and weighters have in common: typed params, a registry, resumable state.

A *component* turns scores into a decision and nothing else: a selector into training-set
indices, a mixer into domain proportions, a weighter into per-sample loss weights. Each one is a
class in one file, registered by name for its *kind* (the section of the components file it is
looked up in); a user's own class can be named by path instead (``my_file.py:MyWeighter`` or
``my_package.module:MyWeighter``). Components never import LLaMA-Factory.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
import sys
import traceback
from pathlib import Path
from typing import Any, ClassVar

from .errors import ConfigError
from .params import Params

logger = logging.getLogger("dataflex")

# train_type -> the section of the components file its component is looked up in
KIND_OF_TRAIN_TYPE = {"dynamic_select": "selectors", "dynamic_mix": "mixers", "dynamic_weight": "weighters"}
KINDS = ("selectors", "mixers", "weighters")
SINGULAR = {"selectors": "selector", "mixers": "mixer", "weighters": "weighter"}


class Component:
    """Base of every component. Subclasses set ``name``, ``Params`` and ``summary``."""

    kind: ClassVar[str] = ""  # "selectors" | "mixers" | "weighters"
    name: ClassVar[str] = ""
    Params: ClassVar[type[Params]] = Params
    summary: ClassVar[str] = ""
    needs_eval: ClassVar[bool] = False  # requires `eval_dataset` in the training YAML
    supported_finetuning: ClassVar[tuple[str, ...] | None] = None  # None: any finetuning_type

    def __init__(self, params: Params):
        self.params = params

    def check_data(self, train_size: int, eval_size: int | None) -> None:
        """Checks that need the tokenized data's sizes (run once before training; raise ConfigError)."""

    # State that must survive a restart (saved in the HF checkpoint). JSON-serialisable.
    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


REGISTRY: dict[str, dict[str, type[Component]]] = {kind: {} for kind in KINDS}


def register(cls: type[Component]) -> type[Component]:
    """Class decorator: make ``cls`` available as ``name:`` in its kind's section."""
    if not cls.name or cls.kind not in REGISTRY:
        raise TypeError(f"{cls.__name__} needs a name and a kind in {KINDS}")
    REGISTRY[cls.kind][cls.name] = cls
    return cls


def _load_packages() -> None:
    """Import every built-in component module (each registers itself)."""
    from . import mixers, selectors, weighters  # noqa: F401


def available(kind: str) -> dict[str, type[Component]]:
    _load_packages()
    return REGISTRY[kind]


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
    _load_packages()
    base = _base_class(kind)
    if not (isinstance(cls, type) and issubclass(cls, base)):
        raise ConfigError(f"component '{component}': '{spec}' is not a subclass of dataflex {base.__name__}")
    return cls


def _base_class(kind: str) -> type[Component]:
    if kind == "selectors":
        from .selectors.base import Selector as base
    elif kind == "mixers":
        from .mixers.base import Mixer as base
    else:
        from .weighters.base import Weighter as base
    return base


def component_class(kind: str, name: str, component: str, base_dir: Path | None = None) -> type[Component]:
    """The class a components-file entry names, for ``kind``; a ``:`` in the name loads a user's class."""
    if ":" in name:
        return _user_class(name, kind, component, base_dir)
    known = available(kind)
    if name not in known:
        raise ConfigError(f"component '{component}': unknown {SINGULAR[kind]} name '{name}'; "
                          f"available: {', '.join(sorted(known))} (or 'file.py:Class' for your own)")
    return known[name]
