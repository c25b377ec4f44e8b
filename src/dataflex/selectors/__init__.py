"""Selectors: one file each, registered by name with ``@register``.

Importing this package imports every module in it, so a new selector file is picked up
without touching this file.
"""

import importlib
import pkgutil

from .base import SELECTORS, SelectionContext, SelectionResult, Selector, get_selector_class, register
from .params import Params

for _mod in sorted(m.name for m in pkgutil.iter_modules(__path__)):
    if _mod not in ("base", "params"):
        importlib.import_module(f"{__name__}.{_mod}")

__all__ = ["SELECTORS", "Params", "SelectionContext", "SelectionResult", "Selector", "get_selector_class", "register"]
