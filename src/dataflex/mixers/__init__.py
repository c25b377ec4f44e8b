"""Mixers (``train_type: dynamic_mix``): one file each, registered by name with ``@register``."""

import importlib
import pkgutil

from ..component import REGISTRY
from .base import DomainStats, MixContext, MixDecision, Mixer

for _mod in sorted(m.name for m in pkgutil.iter_modules(__path__)):
    if _mod != "base":
        importlib.import_module(f"{__name__}.{_mod}")

MIXERS = REGISTRY.setdefault("mixers", {})

__all__ = ["MIXERS", "DomainStats", "MixContext", "MixDecision", "Mixer"]
