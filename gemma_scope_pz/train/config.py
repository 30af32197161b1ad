"""The training configuration: a nested, validated :class:`TrainConfig`.

``TrainConfig(sae=DictionaryConfig(...), loss=LossConfig(...), optim=OptimConfig(...),
run=RunConfig(...))`` holds every knob of an SAE / transcoder training run, grouped by what it is
about: the dictionary (architecture, sites, widths, k, thresholds, normalisation), its loss
(sparsity coefficients, AuxK, dead latents), the optimiser and schedule, and the run (length, batch,
checkpoints, logging, seed, provenance). Every field carries its help text in
``dataclasses.field(metadata={"help": ...})`` (the CLI's ``--sae.k 64`` overrides are built from it);
values are converted to their annotated types and range-checked when a config is built (see
:mod:`~gemma_scope_pz.train.config_values`).

Configs round-trip through nested JSON and YAML; unknown keys are refused by name. Old *flat* files
(``d_in: 640``, ``k: 32`` …) still load, with a ``DeprecationWarning``, and so do the old flat
attribute reads (``config.k`` → ``config.sae.k``).

Units: every coefficient and threshold refers to *normalised* activations (see
``sae.normalization``); with the default ``"unit_mean_sq_norm"`` the inputs have
``E||x||^2 = d_in``, i.e. about unit variance per coordinate.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import typing
import warnings
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import yaml

from gemma_scope_pz.io import write_atomically
from gemma_scope_pz.train.config_sections import (
    ARCHITECTURES,
    BASE_ACTIVATIONS,
    FLAT_NAMES,
    NORMALIZATIONS,
    SECTIONS,
    DictionaryConfig,
    LossConfig,
    OptimConfig,
    RunConfig,
)
from gemma_scope_pz.train.config_values import parse_string, type_name

JUMPRELU_AUX_K = 32  # AuxK latents per row of a JumpReLU dictionary (no k to scale it by)
DEAD_WINDOW_MAX_TOKENS = 10_000_000  # the default dead window's cap (a twentieth of the run below)

__all__ = [
    "ARCHITECTURES",
    "BASE_ACTIVATIONS",
    "FLAT_NAMES",
    "NORMALIZATIONS",
    "SECTIONS",
    "ConfigField",
    "DictionaryConfig",
    "LossConfig",
    "OptimConfig",
    "RunConfig",
    "TrainConfig",
    "apply_overrides",
    "config_fields",
]


# "auto" takes the sparse JumpReLU path when d_sae >= this many times the cap. Measured on the CPU
# (benchmarks/train_step.py, 640-wide rows, batch 4096, scatter-add encoder gradient): with cap 64
# the two paths are even at 4,096 latents (64x), sparse is 1.2x faster at 8,192 (128x); with cap
# 32 at 16,384 latents (512x) 2.2x; at 2,048 latents (32x) it is 2x slower.
SPARSE_JUMPRELU_WIDTH_PER_CAP = 128


@dataclasses.dataclass(frozen=True)
class ConfigField:
    """One overridable field, for building command-line options.

    Attributes:
      key: dotted name, e.g. ``"sae.k"``.
      hint: annotated type.
      type_name: readable type, e.g. ``"int | None"``.
      default: default value (``dataclasses.MISSING`` if required).
      help: help text.
    """

    key: str
    hint: Any
    type_name: str
    default: Any
    help: str


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything that defines one SAE / transcoder training run, in four sections.

    Attributes:
      sae: The dictionary (:class:`DictionaryConfig`).
      run: The run (:class:`RunConfig`); needs ``total_steps`` or ``total_tokens``.
      loss: The objective's coefficients (:class:`LossConfig`).
      optim: Optimiser and schedule (:class:`OptimConfig`).
    """

    sae: DictionaryConfig
    run: RunConfig
    loss: LossConfig = dataclasses.field(default_factory=LossConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)

    def __post_init__(self):
        for name, cls in SECTIONS.items():
            value = getattr(self, name)
            if isinstance(value, Mapping):
                object.__setattr__(self, name, _section_from_dict(cls, name, value))
            elif not isinstance(value, cls):
                raise TypeError(f"TrainConfig.{name}: expected {cls.__name__}, got {value!r}")
        if self.sae.sparse_topk and self.loss.frequency_coeff > 0:
            raise ValueError(
                "loss.frequency_coeff needs the dense path: set sae.sparse_topk=false or "
                "loss.frequency_coeff=0"
            )

    def __getattr__(self, name: str) -> Any:
        # Deprecated flat reads (config.k → config.sae.k); only called for missing attributes.
        section = FLAT_NAMES.get(name) or (
            "sae" if name in ("out_dim", "is_transcoder", "activation", "uses_topk") else None
        )
        if section is None or name.startswith("__"):
            raise AttributeError(f"TrainConfig has no attribute {name!r}")
        warnings.warn(
            f"TrainConfig.{name} is deprecated; use TrainConfig.{section}.{name}",
            DeprecationWarning,
            stacklevel=2,
        )
        return getattr(object.__getattribute__(self, section), name)

    # ----------------------------------------------------------------- derived values
    @property
    def num_steps(self) -> int:
        """Total optimizer steps."""
        return self.run.num_steps

    @property
    def dead_window_steps(self) -> int:
        """``loss.dead_window_tokens`` in steps (at least 1); by default a twentieth of the run,
        at most ``DEAD_WINDOW_MAX_TOKENS``."""
        tokens = self.loss.dead_window_tokens
        if tokens is None:
            tokens = min(DEAD_WINDOW_MAX_TOKENS, self.num_steps * self.run.batch_size // 20)
        return max(1, math.ceil(tokens / self.run.batch_size))

    @property
    def effective_aux_k(self) -> int:
        """AuxK latent count: ``loss.aux_k``, by default ``2 * k`` (TopK-style) or
        ``JUMPRELU_AUX_K`` (JumpReLU); 0 when AuxK is off or the activation is ReLU."""
        if self.loss.aux_k_coeff == 0:
            return 0
        if self.sae.uses_topk:
            default = 2 * self.sae.k
        elif self.sae.activation == "jumprelu":
            default = JUMPRELU_AUX_K
        else:
            return 0
        return min(default if self.loss.aux_k is None else self.loss.aux_k, self.sae.d_sae)

    @property
    def jumprelu_sparse_cap(self) -> int:
        """Per-row capacity of the sparse JumpReLU decode, or 0 when the dense path is used."""
        if self.sae.architecture != "jumprelu" or self.sae.sparse_jumprelu == "off":
            return 0
        cap = self.sae.sparse_cap
        if cap is None:
            if self.loss.target_l0 is None and self.sae.sparse_jumprelu == "auto":
                return 0  # no expected L0 to size the cap from
            cap = max(64, math.ceil(4 * (self.loss.target_l0 or 0)))
        cap = min(cap, self.sae.d_sae)
        if (
            self.sae.sparse_jumprelu == "auto"
            and SPARSE_JUMPRELU_WIDTH_PER_CAP * cap > self.sae.d_sae
        ):
            return 0
        return cap

    def hyperparameters(self) -> dict[str, Any]:
        """Flat ``{"sae.k": 32, …}`` of every field that changes what is trained (not paths,
        logging or the fault policy): what a resumed run and a reused export must match."""
        operational = {f.key for f in config_fields() if _metadata(f.key).get("operational")}
        return {k: v for k, v in self.to_flat_dict().items() if k not in operational}

    # ----------------------------------------------------------------- serialisation
    def to_dict(self) -> dict[str, dict[str, Any]]:
        """Nested plain dict ``{"sae": {...}, "loss": {...}, "optim": {...}, "run": {...}}``."""
        out = {}
        for name in SECTIONS:
            values = dataclasses.asdict(getattr(self, name))
            out[name] = {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}
        return out

    def to_flat_dict(self) -> dict[str, Any]:
        """``{"sae.d_in": 640, …}`` with dotted keys."""
        return {f"{s}.{k}": v for s, values in self.to_dict().items() for k, v in values.items()}

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], *, source: str = "dict") -> TrainConfig:
        """Builds a config from a nested mapping (or an old flat one, with a DeprecationWarning).

        Errors name ``source`` and the offending key.
        """
        if not isinstance(values, Mapping):
            raise ValueError(
                f"{source}: expected a mapping of config sections, got {type(values).__name__}"
            )
        nested: dict[str, dict[str, Any]] = {name: {} for name in SECTIONS}
        flat, unknown = [], []
        for key, value in values.items():
            if key in SECTIONS:
                if not isinstance(value, Mapping):
                    raise ValueError(f"{source}: section {key!r} must be a mapping, got {value!r}")
                nested[key].update(value)
            elif key in FLAT_NAMES:
                nested[FLAT_NAMES[key]][key] = value
                flat.append(key)
            else:
                unknown.append(str(key))
        if unknown:
            raise ValueError(f"{source}: unknown config key(s) {sorted(unknown)}")
        if flat:
            warnings.warn(
                f"{source}: flat config keys are deprecated; nest them under sae/loss/optim/run "
                f"(e.g. {FLAT_NAMES[flat[0]]}.{flat[0]})",
                DeprecationWarning,
                stacklevel=2,
            )
        try:
            return cls(
                **{
                    name: _section_from_dict(SECTIONS[name], name, nested[name])
                    for name in SECTIONS
                }
            )
        except (ValueError, TypeError) as exc:
            raise ValueError(f"{source}: {exc}") from None

    def to_json(self, path: str | os.PathLike | None = None) -> str:
        """JSON text of the config; also written atomically to ``path`` if given."""
        text = json.dumps(self.to_dict(), indent=2, sort_keys=True)
        if path is not None:
            write_atomically(path, text)
        return text

    @classmethod
    def from_json(cls, text_or_path: str | os.PathLike) -> TrainConfig:
        """Parses JSON text, or reads it from a file path."""
        text, source = _read_text(text_or_path)
        try:
            values = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{source}: not valid JSON ({exc})") from None
        return cls.from_dict(values, source=source)

    def to_yaml(self, path: str | os.PathLike | None = None) -> str:
        """YAML text of the config; also written atomically to ``path`` if given."""
        text = yaml.safe_dump(self.to_dict(), sort_keys=False)
        if path is not None:
            write_atomically(path, text)
        return text

    @classmethod
    def from_yaml(cls, text_or_path: str | os.PathLike) -> TrainConfig:
        """Parses YAML text, or reads it from a file path."""
        text, source = _read_text(text_or_path)
        try:
            values = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ValueError(f"{source}: not valid YAML ({' '.join(str(exc).split())})") from None
        return cls.from_dict(values, source=source)

    @classmethod
    def from_overrides(cls, base: TrainConfig, overrides: Iterable[str]) -> TrainConfig:
        """``base`` with ``["sae.k=64", "optim.lr=1e-3", …]`` applied (see :func:`apply_overrides`)."""
        pairs = {}
        for item in overrides:
            key, sep, value = item.partition("=")
            if not sep:
                raise ValueError(f"override {item!r}: expected section.field=value")
            pairs[key.strip()] = value
        return apply_overrides(base, pairs)

    def replace(self, **changes: Any) -> TrainConfig:
        """A copy with whole sections (``sae=...``) or, deprecated, old flat fields changed."""
        sections = {k: v for k, v in changes.items() if k in SECTIONS}
        flat = {f"{FLAT_NAMES.get(k, '?')}.{k}": v for k, v in changes.items() if k not in SECTIONS}
        if flat:
            warnings.warn(
                "TrainConfig.replace(flat=...) is deprecated; use apply_overrides(cfg, {'run.seed': 1})",
                DeprecationWarning,
                stacklevel=2,
            )
        out = dataclasses.replace(self, **sections)
        return apply_overrides(out, flat) if flat else out


def _section_from_dict(cls: type, name: str, values: Mapping[str, Any]):
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(str(k) for k in values if k not in known)
    if unknown:
        raise ValueError(f"unknown key(s) {[f'{name}.{k}' for k in unknown]}")
    missing = [f.name for f in dataclasses.fields(cls) if _required(f) and f.name not in values]
    if missing:
        raise ValueError(f"missing required key(s) {[f'{name}.{k}' for k in missing]}")
    return cls(**values)


def _required(f: dataclasses.Field) -> bool:
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING


def _metadata(key: str) -> Mapping[str, Any]:
    section, _, name = key.partition(".")
    return {f.name: f.metadata for f in dataclasses.fields(SECTIONS[section])}[name]


def config_fields() -> Iterator[ConfigField]:
    """Every field of every section, in declaration order, with its help (for CLI options)."""
    for section, cls in SECTIONS.items():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            default = (
                f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            )
            hint = hints[f.name]
            yield ConfigField(
                f"{section}.{f.name}", hint, type_name(hint), default, f.metadata["help"]
            )


def apply_overrides(config: TrainConfig, overrides: Mapping[str, Any]) -> TrainConfig:
    """``config`` with ``{"sae.k": "64", "run.log_path": None, …}`` applied and re-validated.

    String values are parsed into the field's annotated type (``"true"``, ``"none"``, ``"8,16"``);
    other values are converted as when a config is built. Unknown keys are refused by name.
    """
    fields = {f.key: f for f in config_fields()}
    changes: dict[str, dict[str, Any]] = {}
    for key, value in overrides.items():
        if key not in fields:
            raise ValueError(
                f"override {key!r}: unknown config key (expected e.g. sae.k, optim.lr)"
            )
        if isinstance(value, str):
            value = parse_string(value, fields[key].hint, key)
        section, _, name = key.partition(".")
        changes.setdefault(section, {})[name] = value
    sections = {s: dataclasses.replace(getattr(config, s), **c) for s, c in changes.items()}
    return dataclasses.replace(config, **sections)


def _read_text(text_or_path: str | os.PathLike) -> tuple[str, str]:
    if isinstance(text_or_path, os.PathLike) or (
        isinstance(text_or_path, str) and "\n" not in text_or_path and os.path.isfile(text_or_path)
    ):
        with open(text_or_path, encoding="utf-8") as f:
            return f.read(), os.fspath(text_or_path)
    return str(text_or_path), "text"
