"""Selectors: one file each, registered by name. Importing this package registers them all."""

from . import delta_loss, loss, random  # noqa: F401  (each registers its selector)
from .base import SELECTORS, SelectionContext, SelectionResult, Selector, get_selector_class, register
from .params import Params

__all__ = ["SELECTORS", "Params", "SelectionContext", "SelectionResult", "Selector", "get_selector_class", "register"]
