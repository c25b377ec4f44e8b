"""Typed, strict component parameters (selectors, mixers and weighters alike).

Each component declares its parameters as a dataclass deriving from :class:`Params`. The
components YAML is checked against it: an unknown key, a value of the wrong type or out of range
is a :class:`~dataflex.errors.ConfigError` naming the component, the key, the value and what is
allowed - never silently dropped. A parameter that the original DataFlex accepts but that has no
meaning here is listed in ``Params.inert`` with the reason; it is accepted with one warning line,
so a components file written for the original loads unchanged while a misspelt key still fails.

Why not ``HfArgumentParser.parse_dict`` or ``OmegaConf.structured``: see docs/architecture.md
("Hand-written code a library already does").
"""

from __future__ import annotations

import dataclasses
import logging
import types
import typing
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, Union, get_args, get_origin

from .errors import ConfigError

logger = logging.getLogger("dataflex")
_NONE = type(None)


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) if not isinstance(a, str) else a for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in get_args(tp))
    if origin in (list, tuple):
        args = get_args(tp)
        return f"list of {_type_name(args[0])}" if args else "list"
    if origin is dict or tp is dict:
        return "mapping"
    if tp is _NONE:
        return "null"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any) -> Any:
    """Return ``value`` converted to ``tp`` or raise ``TypeError``. Only lossless conversions."""
    origin = get_origin(tp)
    if origin is Literal:
        if value in get_args(tp):
            return value
        raise TypeError
    if origin in (Union, types.UnionType):
        for arg in get_args(tp):
            try:
                return _coerce(value, arg)
            except TypeError:
                continue
        raise TypeError
    if tp is _NONE:
        if value is None:
            return None
        raise TypeError
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise TypeError
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise TypeError
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise TypeError
    if tp is str:
        if isinstance(value, str):
            return value
        raise TypeError
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise TypeError
        (item_tp,) = get_args(tp)[:1] or (Any,)
        return [_coerce(v, item_tp) for v in value]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise TypeError
        args = get_args(tp)
        value_tp = args[1] if len(args) == 2 else Any
        return {str(k): _coerce(v, value_tp) for k, v in value.items()}
    raise TypeError(f"unsupported parameter type {tp!r}")


@dataclass
class Params:
    """Base of every component's parameter dataclass. ``cache_dir`` is common to all."""

    cache_dir: str | None = dataclasses.field(
        default=None,
        metadata={"help": "Folder for this run's records: <cache_dir>/<run id>/ (default: <output_dir>/dataflex)."},
    )

    # Params of the original DataFlex that have no effect here: name -> why (accepted with a warning).
    inert: ClassVar[dict[str, str]] = {}

    def _component(self) -> str:
        return getattr(self, "_component_name", "?")

    @classmethod
    def from_dict(cls, component: str, raw: dict[str, Any] | None, warn: bool = True) -> "Params":
        raw = dict(raw or {})
        hints = typing.get_type_hints(cls)
        fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
        for key in sorted(set(raw) & set(cls.inert) - set(fields)):
            if warn:
                logger.warning("[DataFlex] component '%s': param '%s' has no effect here (%s)",
                               component, key, cls.inert[key])
            raw.pop(key)
        unknown = sorted(set(raw) - set(fields))
        if unknown:
            import difflib

            close = difflib.get_close_matches(unknown[0], list(fields), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(
                f"component '{component}': unknown param '{unknown[0]}'{hint}; valid params: {', '.join(sorted(fields))}"
            )
        values = {}
        for name, value in raw.items():
            tp = hints[name]
            try:
                values[name] = _coerce(value, tp)
            except TypeError:
                kind = "is invalid; allowed" if get_origin(tp) is Literal else "has the wrong type; expected"
                raise ConfigError(
                    f"component '{component}': param '{name}' = {value!r} {kind}: {_type_name(tp)}"
                ) from None
        obj = cls(**values)
        object.__setattr__(obj, "_component_name", component)
        obj.check()
        return obj

    def check(self) -> None:
        """Range checks beyond the type; override and call :meth:`fail` for a bad value."""

    def check_count_or_fraction(self, key: str) -> None:
        """``key`` is unset, an integer >= 1, or a fraction in (0, 1] (e.g. a candidate pool)."""
        value = getattr(self, key)
        if (isinstance(value, int) and value < 1) or (isinstance(value, float) and not 0.0 < value <= 1.0):
            self.fail(key, "an integer >= 1 or a fraction in (0, 1]")

    def fail(self, key: str, allowed: str) -> typing.NoReturn:
        raise ConfigError(
            f"component '{self._component()}': param '{key}' = {getattr(self, key)!r} is invalid; allowed: {allowed}"
        )

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def describe(cls) -> list[tuple[str, str, Any, str]]:
        """``(name, type, default, help)`` for every parameter, for ``dataflex-cli list`` and docs."""
        hints = typing.get_type_hints(cls)
        rows = []
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else (
                f.default_factory() if f.default_factory is not dataclasses.MISSING else None  # type: ignore[misc]
            )
            rows.append((f.name, _type_name(hints[f.name]), default, f.metadata.get("help", "")))
        return rows
