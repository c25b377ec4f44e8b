"""Reorderers (``train_type: dynamic_reorder``): one file each, registered by name with ``@register``."""

import importlib
import pkgutil

from ..component import REGISTRY
from .base import OrderResult, ReorderContext, Reorderer, ReorderParams, sort_rows

for _mod in sorted(m.name for m in pkgutil.iter_modules(__path__)):
    if _mod != "base":
        importlib.import_module(f"{__name__}.{_mod}")

REORDERERS = REGISTRY.setdefault("reorderers", {})

__all__ = ["REORDERERS", "OrderResult", "ReorderContext", "ReorderParams", "Reorderer", "sort_rows"]
