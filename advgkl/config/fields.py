"""Typed config fields: `opt(default, choices=..., ge=...)` declares one, `coerce` and
`check_field` check a value against it. Shared by the config tree and the methods' settings."""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import field
from typing import Any

from advgkl.errors import ConfigError

_NUMBER = r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?"
_NUMBER_OR_FRACTION = re.compile(rf"\s*({_NUMBER})\s*(?:/\s*({_NUMBER})\s*)?")


def opt(default: Any, *, choices: tuple[str, ...] | None = None, ge: float | None = None,
        gt: float | None = None, le: float | None = None, lt: float | None = None,
        eps: bool = False, doc: str = "") -> Any:
    """A config field: default, allowed choices, numeric bounds; `eps=True` marks a perturbation
    size in [0,1]-image units (written as k/255 when it is one, checked against the norm)."""
    meta = {"choices": choices, "ge": ge, "gt": gt, "le": le, "lt": lt, "eps": eps, "doc": doc}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


def parse_number(key: str, value: Any) -> float:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        match = _NUMBER_OR_FRACTION.fullmatch(value)
        if match:
            num, den = match.groups()
            if den is None:
                return float(num)
            if float(den) == 0:
                raise ConfigError(f"{key}: {value!r} divides by zero")
            return float(num) / float(den)
    raise ConfigError(f"{key}: expected a number such as 0.5 or 8/255, got {value!r}")


def coerce(key: str, value: Any, hint: Any) -> Any:
    """Check `value` against the type `hint`, converting only where it is lossless."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return coerce(key, value, inner)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (inner,) = typing.get_args(hint)
        return [coerce(f"{key}[{i}]", v, inner) for i, v in enumerate(value)]
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if hint is float:
        return parse_number(key, value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config type {hint!r} for {key}")


def check_field(key: str, value: Any, meta: typing.Mapping[str, Any]) -> None:
    choices = meta.get("choices")
    if choices and value not in choices:
        raise ConfigError(f"{key}: {value!r} is not one of {', '.join(choices)}")
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return
    bounds = (("ge", ">=", lambda v, b: v >= b), ("gt", ">", lambda v, b: v > b),
              ("le", "<=", lambda v, b: v <= b), ("lt", "<", lambda v, b: v < b))
    for name, sign, ok in bounds:
        bound = meta.get(name)
        if bound is not None and not ok(value, bound):
            raise ConfigError(f"{key}: {value!r} must be {sign} {bound}")


def set_field(obj: Any, key: str, name: str, value: Any) -> None:
    """Set `obj.name` (dataclass field, dotted `key` in messages), type- and range-checked."""
    fields_ = {f.name: f for f in dataclasses.fields(obj)}
    hints = typing.get_type_hints(type(obj))
    if value is False and "off" in (fields_[name].metadata.get("choices") or ()):
        value = "off"  # YAML 1.1 reads a bare off as false
    coerced = coerce(key, value, hints[name])
    check_field(key, coerced, fields_[name].metadata)
    setattr(obj, name, coerced)


def linf_size_problem(value: float) -> str | None:
    """What is wrong with a Linf perturbation size on [0,1] images, if anything."""
    if value > 1:
        return (f"{value:g} is larger than 1, but Linf sizes are on [0,1] images; "
                f"did you mean {value:g}/255?")
    return None
