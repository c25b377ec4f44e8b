"""Weighters (``train_type: dynamic_weight``): one file each, registered by name with ``@register``."""

import importlib
import pkgutil

from ..component import REGISTRY
from .base import WeightContext, Weighter, WeightParams, WeightSignals

for _mod in sorted(m.name for m in pkgutil.iter_modules(__path__)):
    if _mod != "base":
        importlib.import_module(f"{__name__}.{_mod}")

WEIGHTERS = REGISTRY.setdefault("weighters", {})

__all__ = ["WEIGHTERS", "WeightContext", "WeightParams", "WeightSignals", "Weighter"]
