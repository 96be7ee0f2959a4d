"""The parameter schema of a detector: one ``Param`` per parameter holds its default, accepted types,
allowed values or range, whether it is cheap (re-scores cached statistics) and what it does.

A detector's ``PARAMS`` table is the single place where its parameters are declared (in the spirit of
diffusers' ``register_to_config``): construction and ``set_params`` check every value against it with an
error that names the parameter, ``DEFAULTS`` and ``cheap_params`` are derived from it, and
``Detector.config()`` / ``Detector.from_config()`` round-trip it through yml. Checks that relate several
parameters stay in the detector's ``validate_params``.
"""
from __future__ import annotations

import math
import numbers
import os
from dataclasses import dataclass, replace
from typing import Any, Iterable, Mapping


class ParameterError(TypeError, ValueError):
    """A detector parameter of the wrong type or out of range (catchable as either built-in)."""


@dataclass(frozen=True)
class Param:
    """One parameter. ``types`` default to the type of ``default`` (a float parameter also takes ints),
    or to the types of ``choices`` when the default is None; a None default makes the parameter nullable
    (null = "decided elsewhere", e.g. by the variant). ``off=True`` also accepts ``false`` (= switched off)
    besides a number. Numbers must be finite and inside [low, high] (open ends with ``low_open`` /
    ``high_open``)."""

    default: Any
    doc: str = ""
    types: tuple[type, ...] | None = None
    choices: tuple[Any, ...] | None = None
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    nullable: bool = False
    off: bool = False
    cheap: bool = False

    def accepted_types(self) -> tuple[type, ...]:
        kinds = self.types or _type_of_default(self.default)
        if kinds is None and self.choices:
            kinds = tuple(dict.fromkeys(type(c) for c in self.choices if c is not None))
        if not kinds:
            return ()  # nothing to derive the type from (an older-style declaration): any value
        kinds = tuple(kinds)
        if self.off and bool not in kinds:
            kinds += (bool,)
        if self.default is None or self.nullable:
            kinds += (type(None),)
        return kinds

    def check(self, owner: str, name: str, value: Any) -> None:
        """ParameterError naming ``name`` when ``value`` has the wrong type or lies outside the allowed values."""
        kinds = self.accepted_types()
        if kinds and not any(_is_instance(value, k) for k in kinds):
            wanted = " or ".join(dict.fromkeys(_TYPE_NAMES.get(k, k.__name__) for k in kinds))
            raise ParameterError(f"{owner}: parameter {name!r} must be {wanted}, got {value!r} ({type(value).__name__})")
        if value is None:
            return
        if isinstance(value, bool) and self.off:
            if value:
                raise ParameterError(f"{owner}: parameter {name!r} must be a number, null (the variant's value) or "
                                     f"false (off), got true")
            return
        if self.choices is not None:
            check_choice(owner, name, value, [c for c in self.choices if c is not None])
        if isinstance(value, numbers.Real) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise ParameterError(f"{owner}: parameter {name!r} must be finite, got {value!r}")
            check_range(owner, name, value, self.low, self.high, low_open=self.low_open, high_open=self.high_open)


def legacy_schema(defaults: Mapping[str, Any], param_types: Mapping[str, tuple[type, ...]],
                  cheap: Iterable[str], inherited: Mapping[str, Param] | None = None) -> dict[str, Param]:
    """A schema from the older ``DEFAULTS`` dict + ``PARAM_TYPES`` + ``cheap_params`` declaration (types only;
    ranges stay in ``validate_params``), so third-party detectors written that way keep working. A parameter
    the parent class declared with the same default keeps the parent's spec."""
    cheap, inherited = set(cheap), inherited or {}
    out = {}
    for name, default in defaults.items():
        if isinstance(default, Param):
            spec, default = default, default.default
        else:
            spec = inherited.get(name)
        if spec is None or spec.default != default or name in param_types:
            spec = Param(default, types=tuple(param_types[name]) if name in param_types else None)
        out[name] = replace(spec, cheap=name in cheap)
    return out


def check_params(owner: str, schema: Mapping[str, Param], params: Mapping[str, Any]) -> None:
    """Every value against its ``Param``, in declaration order."""
    for name, spec in schema.items():
        spec.check(owner, name, params[name])


def plain(value: Any) -> Any:
    """A parameter value as plain yml data: tuples -> lists, paths -> strings, numpy scalars -> Python."""
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    return value


def _type_of_default(default: Any) -> tuple[type, ...] | None:
    """Types a parameter with this default accepts (None: not derivable from the default)."""
    if isinstance(default, bool):
        return (bool,)
    if isinstance(default, int):
        return (int,)
    if isinstance(default, float):
        return (float, int)  # 3 is a fine value for a float parameter
    if isinstance(default, str):
        return (str,)
    if isinstance(default, (list, tuple)):
        return (list, tuple)
    if isinstance(default, dict):
        return (dict,)
    return None


_TYPE_NAMES = {bool: "true/false", int: "an integer", float: "a number", str: "a string", list: "a list",
               tuple: "a list", dict: "a mapping", type(None): "null", os.PathLike: "a path"}


def _is_instance(value: Any, kind: type) -> bool:
    # yml/APS values may arrive as numpy scalars; bools are ints to Python but never valid numbers here
    if kind is int:
        return isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if kind is float:
        return isinstance(value, numbers.Real) and not isinstance(value, bool)
    return isinstance(value, kind)


def check_range(owner: Any, name: str, value: Any, low: float | None = None, high: float | None = None, *,
                low_open: bool = False, high_open: bool = False) -> None:
    """ParameterError naming the parameter when ``value`` lies outside [low, high] (or the open ends)."""
    if value is None:
        return
    bad = ((low is not None and (value <= low if low_open else value < low))
           or (high is not None and (value >= high if high_open else value > high)))
    if bad:
        lo = "" if low is None else f"{'>' if low_open else '>='} {low}"
        hi = "" if high is None else f"{'<' if high_open else '<='} {high}"
        cls = owner if isinstance(owner, str) else type(owner).__name__
        raise ParameterError(f"{cls}: parameter {name!r} must be {' and '.join(x for x in (lo, hi) if x)}, got {value!r}")


def check_choice(owner: Any, name: str, value: Any, choices: Iterable[Any]) -> None:
    choices = tuple(choices)
    if value not in choices:
        cls = owner if isinstance(owner, str) else type(owner).__name__
        raise ParameterError(f"{cls}: parameter {name!r} must be one of {list(choices)}, got {value!r}")
