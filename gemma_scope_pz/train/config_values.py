"""Typed config fields: help text, type conversion and range checks for the training config.

The one job of this module: turn a value from Python, YAML, JSON or a command-line string into the
type a config field is annotated with, or refuse it with a one-line error naming the key. It knows
nothing about SAEs; :mod:`~gemma_scope_pz.train.config` declares the fields with :func:`field`.

Rules (strict on purpose, so a typo never trains the wrong thing):

* ``float``: ints, floats and numeric strings (a YAML ``lr: 5e-4`` is a string to PyYAML), finite.
* ``int``: ints, integral floats and integral numeric strings (``"1e6"``); never a bool.
* ``bool``: only real booleans; the string ``"false"`` from a config file is refused. Command-line
  strings go through :func:`parse_string` first, which reads ``true``/``false``/``1``/``0``.
* ``str`` / ``Literal[...]``: strings; a ``Literal`` also checks the choice.
* ``X | None``: ``None`` or an ``X``; ``tuple[int, ...]``: a list or tuple of ints.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Any, Literal


def field(
    default: Any = dataclasses.MISSING,
    help: str = "",  # noqa: A002  (the name F's CLI reads)
    *,
    minimum: float | None = None,
    positive: bool = False,
    maximum: float | None = None,
    operational: bool = False,
) -> Any:
    """A dataclass field whose ``metadata`` carries ``help`` and its range.

    Args:
      default: Default value (omit for a required field).
      help: One-line help, shown by ``gemma-scope-pz train --help``.
      minimum: Smallest allowed value (inclusive).
      positive: The value must be ``> 0``.
      maximum: Largest allowed value (inclusive).
      operational: The field does not change what is trained (paths, logging); a resumed run may
        change it.
    """
    metadata = {
        "help": help,
        "minimum": minimum,
        "positive": positive,
        "maximum": maximum,
        "operational": operational,
    }
    if isinstance(default, tuple | list | dict):
        frozen = tuple(default) if isinstance(default, list | tuple) else default
        return dataclasses.field(default_factory=lambda: frozen, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def _number(value: Any, key: str, kind: str) -> float:
    if isinstance(value, bool):
        raise ValueError(f"{key}={value!r}: expected {kind}, got a boolean")
    if isinstance(value, str):
        try:
            return float(value.strip())
        except ValueError:
            raise ValueError(f"{key}={value!r}: expected {kind}") from None
    if isinstance(value, int | float):
        return float(value)
    if hasattr(value, "dtype") and getattr(value, "shape", None) == ():  # numpy scalars
        return float(value)
    raise ValueError(f"{key}={value!r}: expected {kind}, got {type(value).__name__}")


def _to_int(value: Any, key: str) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return int(value)
    number = _number(value, key, "an integer")
    if not math.isfinite(number) or number != int(number):
        raise ValueError(f"{key}={value!r}: expected an integer")
    return int(number)


def _to_float(value: Any, key: str) -> float:
    number = _number(value, key, "a number")
    if not math.isfinite(number):
        raise ValueError(f"{key}={value!r}: expected a finite number")
    return number


def _to_bool(value: Any, key: str) -> bool:
    if isinstance(value, bool):
        return value
    if hasattr(value, "dtype") and getattr(value, "shape", None) == () and value.dtype == bool:
        return bool(value)
    raise ValueError(f"{key}={value!r}: expected true or false (a boolean, not a string)")


def _union_args(hint: Any) -> tuple[Any, ...] | None:
    origin = typing.get_origin(hint)
    if origin is typing.Union or origin is types.UnionType:
        return typing.get_args(hint)
    return None


def convert(value: Any, hint: Any, key: str) -> Any:
    """``value`` converted to the annotated type ``hint``; ``ValueError`` naming ``key`` if not."""
    args = _union_args(hint)
    if args is not None:
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return convert(value, inner, key)
    origin = typing.get_origin(hint)
    if origin is Literal:
        choices = typing.get_args(hint)
        if not isinstance(value, str) or value not in choices:
            raise ValueError(f"{key}={value!r}: expected one of {list(choices)}")
        return value
    if origin is tuple:
        if isinstance(value, str) or not isinstance(value, list | tuple):
            raise ValueError(f"{key}={value!r}: expected a list")
        (inner, _) = typing.get_args(hint)
        return tuple(convert(v, inner, f"{key}[{i}]") for i, v in enumerate(value))
    if hint is bool:
        return _to_bool(value, key)
    if hint is int:
        return _to_int(value, key)
    if hint is float:
        return _to_float(value, key)
    if hint is str:
        if not isinstance(value, str):
            raise ValueError(f"{key}={value!r}: expected a string")
        return value
    raise TypeError(f"{key}: unsupported field type {hint!r}")


def check_range(value: Any, metadata: dict, key: str) -> None:
    """Applies the ``minimum``/``positive``/``maximum`` of a field (``None`` values pass)."""
    if value is None or isinstance(value, str | tuple | bool):
        return
    if metadata.get("positive") and not value > 0:
        raise ValueError(f"{key}={value!r}: must be > 0")
    low, high = metadata.get("minimum"), metadata.get("maximum")
    if low is not None and value < low:
        raise ValueError(f"{key}={value!r}: must be >= {low}")
    if high is not None and value > high:
        raise ValueError(f"{key}={value!r}: must be <= {high}")


def convert_fields(obj: Any, prefix: str) -> None:
    """Converts and range-checks every field of the frozen dataclass ``obj`` in place."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        key = f"{prefix}.{f.name}"
        value = convert(getattr(obj, f.name), hints[f.name], key)
        check_range(value, f.metadata, key)
        object.__setattr__(obj, f.name, value)


def parse_string(text: str, hint: Any, key: str) -> Any:
    """A command-line string (``"64"``, ``"true"``, ``"none"``, ``"8,16"``) as a ``hint`` value."""
    args = _union_args(hint)
    if args is not None:
        if text.strip().lower() in ("none", "null", "") and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return parse_string(text, inner, key)
    if hint is bool:
        lowered = text.strip().lower()
        if lowered in ("true", "1", "yes", "on"):
            return True
        if lowered in ("false", "0", "no", "off"):
            return False
        raise ValueError(f"{key}={text!r}: expected true or false")
    if typing.get_origin(hint) is tuple:
        items = [t.strip() for t in text.strip().strip("[]()").split(",") if t.strip()]
        (inner, _) = typing.get_args(hint)
        return tuple(parse_string(t, inner, f"{key}[{i}]") for i, t in enumerate(items))
    return convert(text, hint, key)


def type_name(hint: Any) -> str:
    """A short readable name of a field type (``int``, ``float | None``, ``{relu,topk}``)."""
    args = _union_args(hint)
    if args is not None:
        return " | ".join(type_name(a) for a in args)
    if typing.get_origin(hint) is Literal:
        return "{" + ",".join(typing.get_args(hint)) + "}"
    if typing.get_origin(hint) is tuple:
        return f"list[{type_name(typing.get_args(hint)[0])}]"
    return "None" if hint is type(None) else getattr(hint, "__name__", str(hint))
