"""Command-line options for every field of a (nested) config dataclass: ``--sae.k 64``.

:func:`add_dataclass_options` walks a dataclass type, descending into fields whose type is itself a
dataclass, and adds one option per leaf field named by its dotted path. The help text comes from
``dataclasses.field(metadata={"help": ...})`` (or the type when there is none) and shows the default.
:func:`collect_overrides` returns the given options as ``{dotted path: text}``; converting the text
to the field's type and validating it is the config's own job (``TrainConfig.from_overrides``).
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from collections.abc import Iterator
from typing import Any

DEST_PREFIX = "override:"


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def leaf_fields(cls: type, prefix: str = "") -> Iterator[tuple[str, dataclasses.Field, Any]]:
    """(dotted path, field, annotation) of every non-dataclass field, depth first."""
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        tp = hints[f.name]
        if _is_dataclass_type(tp):
            yield from leaf_fields(tp, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", f, tp


def _default_text(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
    else:
        return "required"
    if value is None:
        return "none"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, tuple):
        return ",".join(str(v) for v in value) or "empty"
    return repr(value) if isinstance(value, str) else str(value)


def _type_text(tp: Any) -> str:
    text = getattr(tp, "__name__", None) or str(tp)
    return str(tp).replace("typing.", "") if typing.get_args(tp) else text


def _metavar(tp: Any) -> str:
    """``INT``, ``FLOAT``, ``{relu,topk}`` or ``INT,...`` (``None`` members are left out)."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) is typing.Literal:
        return "{" + ",".join(str(a) for a in args) + "}"
    if typing.get_origin(tp) is tuple:
        return f"{_metavar(args[0]) if args else 'X'},..."
    if args and typing.get_origin(tp) is not None:  # a union such as int | None
        return "|".join(_metavar(a) for a in args)
    return getattr(tp, "__name__", str(tp)).upper()


def add_dataclass_options(
    parser: argparse.ArgumentParser, cls: type, *, title: str | None = None
) -> list[str]:
    """Adds ``--path`` for every leaf field of ``cls``; returns the paths added.

    Options the parser already defines (same option string) are left to the parser.
    """
    group = parser.add_argument_group(title or f"{cls.__name__} fields (override the config file)")
    added = []
    for path, f, tp in leaf_fields(cls):
        help_text = f.metadata.get("help") or f"{cls.__name__} field {path} ({_type_text(tp)})"
        try:
            group.add_argument(
                f"--{path}",
                dest=DEST_PREFIX + path,
                default=argparse.SUPPRESS,
                metavar=_metavar(tp),
                help=f"{help_text} (default: {_default_text(f)})".replace("%", "%%"),
            )
        except argparse.ArgumentError:  # the command has its own option of that name
            continue
        added.append(path)
    return added


def collect_overrides(args: argparse.Namespace) -> dict[str, str]:
    """``{dotted path: value}`` of the dataclass options given on the command line."""
    return {
        key[len(DEST_PREFIX) :]: value
        for key, value in vars(args).items()
        if key.startswith(DEST_PREFIX)
    }
