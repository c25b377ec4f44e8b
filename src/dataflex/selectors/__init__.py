"""Selectors: one file each, registered by name. Importing this package registers them all."""

from . import random  # noqa: F401  (registers "random")
from .base import SELECTORS, SelectionContext, SelectionResult, Selector, get_selector_class, register
from .params import Params

__all__ = ["SELECTORS", "Params", "SelectionContext", "SelectionResult", "Selector", "get_selector_class", "register"]
