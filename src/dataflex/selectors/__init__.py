"""Selectors (``train_type: dynamic_select``): one file each, registered by name with ``@register``.

Importing this package imports every module in it, so a new selector file is picked up
without touching this file.
"""

import importlib
import pkgutil

from ..component import REGISTRY, register
from .base import SelectionContext, SelectionResult, Selector

for _mod in sorted(m.name for m in pkgutil.iter_modules(__path__)):
    if _mod != "base":
        importlib.import_module(f"{__name__}.{_mod}")

SELECTORS = REGISTRY.setdefault("selectors", {})

__all__ = ["SELECTORS", "SelectionContext", "SelectionResult", "Selector", "register"]
