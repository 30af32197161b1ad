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
from typing import Any, Literal

import yaml

from gemma_scope_pz.io import write_atomically
from gemma_scope_pz.train.config_values import convert_fields, field, parse_string, type_name

Activation = Literal["relu", "jumprelu", "topk", "batchtopk"]
ARCHITECTURES = ("relu", "jumprelu", "topk", "batchtopk", "matryoshka")
BASE_ACTIVATIONS = typing.get_args(Activation)
NORMALIZATIONS = ("none", "unit_mean_sq_norm", "center_unit")


@dataclasses.dataclass(frozen=True)
class DictionaryConfig:
    """The dictionary: what is trained, where it reads and writes, and its input normalisation.

    Attributes:
      d_in, d_sae, d_out: input width, number of latents, target width (``None``: ``d_in``).
      architecture, matryoshka_activation, matryoshka_prefixes, k, sparse_topk: the activation.
      jumprelu_init_threshold, affine_skip, unit_norm_decoder, decoder_init_norm, b_dec_init:
        parameters and their initialisation.
      normalization, norm_estimation_batches: activation normalisation, folded into exports.
      site_in, site_out: model sites (``site_out`` different from ``site_in``: a transcoder).
    """

    d_in: int = field(help="Width of the input activations.", minimum=1)
    d_sae: int = field(help="Number of latents (dictionary width).", minimum=1)
    d_out: int | None = field(
        None,
        "Width of the target; None means d_in (an autoencoder). Set it for a transcoder.",
        minimum=1,
    )
    architecture: Literal["relu", "jumprelu", "topk", "batchtopk", "matryoshka"] = field(
        "jumprelu",
        "relu (L1), jumprelu (L0 via STE), topk, batchtopk or matryoshka (nested prefixes).",
    )
    matryoshka_activation: Activation = field(
        "batchtopk", "Activation of the matryoshka architecture."
    )
    matryoshka_prefixes: tuple[int, ...] = field(
        (), "Increasing matryoshka prefix sizes; d_sae is appended if missing."
    )
    k: int = field(
        32, "Active latents per token (TopK; BatchTopK keeps k * batch per batch).", minimum=1
    )
    sparse_topk: bool = field(
        False, "TopK only: gather the k selected encoder columns/decoder rows (sparse backward)."
    )
    jumprelu_init_threshold: float = field(0.1, "Initial JumpReLU threshold.", positive=True)
    affine_skip: bool = field(False, "Transcoders: add a learned linear skip x_in @ w_skip.")
    unit_norm_decoder: bool = field(True, "Keep decoder rows at unit norm.")
    decoder_init_norm: float = field(
        0.1, "Norm of the initial decoder rows when unit_norm_decoder is false.", positive=True
    )
    b_dec_init: Literal["geometric_median", "mean", "zeros"] = field(
        "geometric_median",
        "Initial b_dec: geometric_median or mean of the first batches, or zeros.",
    )
    normalization: Literal["none", "unit_mean_sq_norm", "center_unit"] = field(
        "unit_mean_sq_norm", "none, unit_mean_sq_norm (x * s, E||x s||^2 = d) or center_unit."
    )
    norm_estimation_batches: int = field(
        8, "Batches used to estimate the normaliser and b_dec.", minimum=1
    )
    site_in: str = field("", "Input site, e.g. blocks.9.resid_post.")
    site_out: str = field("", "Target site; empty or equal to site_in for an SAE.")

    def __post_init__(self):
        convert_fields(self, "sae")
        prefixes = self.matryoshka_prefixes
        if self.architecture == "matryoshka":
            if not prefixes or prefixes[-1] != self.d_sae:
                prefixes = prefixes + (self.d_sae,)
            if any(b <= a for a, b in zip((0,) + prefixes, prefixes, strict=False)) or (
                prefixes[-1] > self.d_sae
            ):
                raise ValueError(
                    f"sae.matryoshka_prefixes={list(self.matryoshka_prefixes)}: must increase "
                    f"strictly within (0, d_sae={self.d_sae}]"
                )
        object.__setattr__(self, "matryoshka_prefixes", prefixes)
        if self.uses_topk and self.k > self.d_sae:
            raise ValueError(f"sae.k={self.k}: exceeds sae.d_sae={self.d_sae}")
        if self.sparse_topk and self.architecture != "topk":
            raise ValueError(
                f"sae.sparse_topk needs architecture 'topk', not {self.architecture!r}"
            )
        if self.affine_skip and not self.is_transcoder:
            raise ValueError("sae.affine_skip needs a transcoder (set sae.d_out or sae.site_out)")

    @property
    def out_dim(self) -> int:
        """Width of the reconstruction target."""
        return self.d_in if self.d_out is None else self.d_out

    @property
    def is_transcoder(self) -> bool:
        """True when the target differs from the input (``d_out`` or ``site_out`` given)."""
        return self.d_out is not None or (bool(self.site_out) and self.site_out != self.site_in)

    @property
    def activation(self) -> str:
        """The latent activation: the architecture, or the matryoshka base activation."""
        return (
            self.matryoshka_activation if self.architecture == "matryoshka" else self.architecture
        )

    @property
    def uses_topk(self) -> bool:
        """True for TopK-style activations (TopK, BatchTopK, matryoshka over either)."""
        return self.activation in ("topk", "batchtopk")


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """The training objective beyond reconstruction: sparsity terms, AuxK and dead latents.

    Attributes:
      l1_coeff, l0_coeff, target_l0, target_l0_coeff, jumprelu_bandwidth: sparsity penalties.
      aux_k, aux_k_coeff, dead_window_tokens: the AuxK loss on dead latents.
      sparsity_warmup_steps: linear warm-up of the sparsity coefficients.
    """

    l1_coeff: float = field(
        5.0, "Weight of the decoder-norm-weighted L1 penalty (relu).", minimum=0
    )
    l0_coeff: float = field(1.0, "Weight of the L0 penalty (jumprelu).", minimum=0)
    target_l0: float | None = field(
        None, "If set, jumprelu adds target_l0_coeff * (L0 - target_l0)^2.", minimum=0
    )
    target_l0_coeff: float = field(0.0, "Weight of the quadratic target-L0 penalty.", minimum=0)
    jumprelu_bandwidth: float = field(
        0.05, "Width of the rectangle kernel of the threshold pseudo-derivative.", positive=True
    )
    aux_k: int | None = field(None, "Latents used by AuxK (None: 2 * k; 0 disables it).", minimum=0)
    aux_k_coeff: float = field(1.0 / 32.0, "Weight of the AuxK loss (TopK-style).", minimum=0)
    dead_window_tokens: int = field(
        10_000_000, "A latent silent for this many tokens counts as dead.", minimum=1
    )
    sparsity_warmup_steps: int = field(
        1000, "Linear warm-up of the sparsity coefficients from 0.", minimum=0
    )

    def __post_init__(self):
        convert_fields(self, "loss")


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """Adam, gradient clipping and the learning-rate schedule.

    Attributes:
      lr, adam_b1, adam_b2, adam_eps: Adam.
      warmup_steps, lr_decay, lr_final_fraction: the schedule.
      grad_clip_norm: global-norm clipping (None or 0 disables it).
    """

    lr: float = field(3e-4, "Peak learning rate of Adam.", positive=True)
    adam_b1: float = field(0.9, "Adam beta1.", minimum=0, maximum=1)
    adam_b2: float = field(0.999, "Adam beta2.", minimum=0, maximum=1)
    adam_eps: float = field(1e-8, "Adam epsilon.", positive=True)
    warmup_steps: int = field(1000, "Linear learning-rate warm-up steps from 0 to lr.", minimum=0)
    lr_decay: Literal["cosine", "constant"] = field(
        "cosine", "cosine (to lr * lr_final_fraction at the last step) or constant."
    )
    lr_final_fraction: float = field(
        0.1, "Final learning rate as a fraction of lr.", minimum=0, maximum=1
    )
    grad_clip_norm: float | None = field(
        1.0, "Global-norm gradient clipping (None or 0: off).", minimum=0
    )

    def __post_init__(self):
        convert_fields(self, "optim")


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """The run: its length and batch, precision, checkpoints, logging, faults and provenance.

    Attributes:
      batch_size, total_steps, total_tokens, seed, dtype: what is computed.
      checkpoint_dir, checkpoint_every, keep_checkpoints, log_path, log_every, progress_bar:
        where it is recorded (may change on resume).
      nan_policy, max_skipped_fraction: non-finite batches or gradients.
      model_name, corpus, data_fingerprint: provenance, recorded and checked on resume.
    """

    batch_size: int = field(4096, "Tokens per step.", minimum=1)
    total_steps: int | None = field(None, "Number of steps (or give total_tokens).", minimum=1)
    total_tokens: int | None = field(
        None, "Number of tokens (steps = ceil(total_tokens / batch_size)).", minimum=1
    )
    seed: int = field(0, "Seed of parameter init and data order.")
    dtype: Literal["float32", "bfloat16"] = field(
        "float32", "Matmul dtype (master weights and optimiser stay float32)."
    )
    checkpoint_dir: str | None = field(
        None, "Orbax checkpoint directory (None: no checkpoints).", operational=True
    )
    checkpoint_every: int = field(
        1000, "Checkpoint interval in steps.", minimum=1, operational=True
    )
    keep_checkpoints: int = field(3, "Most recent checkpoints kept.", minimum=1, operational=True)
    log_path: str | None = field(None, "JSONL metrics file (None: no log).", operational=True)
    log_every: int = field(
        100, "Log and show metrics every this many steps.", minimum=1, operational=True
    )
    progress_bar: bool = field(True, "Show a tqdm progress bar.", operational=True)
    nan_policy: Literal["skip", "error"] = field(
        "skip",
        "skip (and count) steps with non-finite data or gradients, or error.",
        operational=True,
    )
    max_skipped_fraction: float = field(
        0.5,
        "Fail (naming the count) when more than this fraction of steps was skipped.",
        minimum=0,
        maximum=1,
        operational=True,
    )
    model_name: str = field("", "Model the activations come from (provenance).")
    corpus: str = field("", "Corpus the activations come from (provenance).")
    data_fingerprint: str = field(
        "", "Identity of the training activations (the pipeline sets it); checked on resume."
    )

    def __post_init__(self):
        convert_fields(self, "run")
        if self.total_steps is None and self.total_tokens is None:
            raise ValueError("run: needs run.total_steps or run.total_tokens (>= 1)")

    @property
    def num_steps(self) -> int:
        """Total optimizer steps."""
        if self.total_steps is not None:
            return self.total_steps
        return math.ceil(self.total_tokens / self.batch_size)


SECTIONS: dict[str, type] = {
    "sae": DictionaryConfig,
    "loss": LossConfig,
    "optim": OptimConfig,
    "run": RunConfig,
}
# Old flat names ("k", "lr" …) → their section; every field name is unique across sections.
FLAT_NAMES: dict[str, str] = {
    f.name: section for section, cls in SECTIONS.items() for f in dataclasses.fields(cls)
}


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
        """``loss.dead_window_tokens`` in steps (at least 1)."""
        return max(1, math.ceil(self.loss.dead_window_tokens / self.run.batch_size))

    @property
    def effective_aux_k(self) -> int:
        """AuxK latent count (0 when AuxK is off or the activation is not TopK-style)."""
        if not self.sae.uses_topk:
            return 0
        value = 2 * self.sae.k if self.loss.aux_k is None else self.loss.aux_k
        return min(value, self.sae.d_sae)

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
