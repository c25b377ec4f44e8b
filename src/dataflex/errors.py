"""Exceptions DataFlex raises on purpose; the CLI prints their message on one line."""


class DataFlexError(Exception):
    """Base class of DataFlex's own errors."""


class ConfigError(DataFlexError, ValueError):
    """A configuration problem found before training starts (one line, names the key)."""


class SelectionError(DataFlexError, RuntimeError):
    """A selection failed on at least one rank; carries the original message."""
