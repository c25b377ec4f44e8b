"""Exceptions DataFlex raises on purpose; the CLI prints their message on one line."""


class DataFlexError(Exception):
    """Base class of DataFlex's own errors."""


class ConfigError(DataFlexError, ValueError):
    """A configuration problem found before training starts (one line, names the key)."""


class SelectionError(DataFlexError, RuntimeError):
    """A selection failed on at least one rank; carries the original message."""


def parse_problem(err: BaseException) -> str:
    """Where and what a YAML / JSON parse error is, for a one-line message: ``" (line 3): <problem>"``."""
    mark = getattr(err, "problem_mark", None)
    where = f" (line {mark.line + 1})" if mark is not None else ""
    text = str(err).strip()
    problem = getattr(err, "problem", None) or (text.splitlines()[0] if text else type(err).__name__)
    return f"{where}: {problem}"
