"""Training configuration for sparse autoencoders and transcoders.

One frozen dataclass, :class:`TrainConfig`, holds every knob of a training run. It round-trips
through JSON and YAML; unknown keys are rejected with an error naming the key, so a typo in a
config file never silently falls back to a default.

Units: every coefficient and threshold refers to *normalised* activations (see
``normalization``); with the default ``"unit_mean_sq_norm"`` the inputs have
``E||x||^2 = d_in``, i.e. about unit variance per coordinate.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any

import yaml

from gemma_scope_pz.io import write_atomically

ARCHITECTURES = ("relu", "jumprelu", "topk", "batchtopk", "matryoshka")
BASE_ACTIVATIONS = ("relu", "jumprelu", "topk", "batchtopk")
NORMALIZATIONS = ("none", "unit_mean_sq_norm", "center_unit")
DTYPES = ("float32", "bfloat16")
NAN_POLICIES = ("skip", "error")
B_DEC_INITS = ("geometric_median", "mean", "zeros")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything that defines one SAE / transcoder training run.

    Attributes:
      d_in: Width of the input activations.
      d_sae: Number of latents (dictionary width).
      d_out: Width of the target activations; ``None`` means ``d_in`` and an autoencoder
        (target = input). Set it (or ``site_out``) to train a transcoder.
      architecture: "relu" (L1), "jumprelu" (L0 via straight-through estimator), "topk",
        "batchtopk" or "matryoshka" (nested prefixes, activation ``matryoshka_activation``).
      matryoshka_activation: Activation used by the matryoshka architecture.
      matryoshka_prefixes: Increasing prefix sizes; ``d_sae`` is appended if missing.
      k: Active latents per token for TopK / BatchTopK (BatchTopK keeps ``k * batch`` per batch).
      sparse_topk: TopK only: after a dense (gradient-free) encoder pass selects the k latents,
        recompute their pre-activations and decode with gathers of the selected encoder columns
        and decoder rows, so the backward pass touches only active latents.
      l1_coeff: Weight of the decoder-norm-weighted L1 penalty (ReLU).
      l0_coeff: Weight of the L0 penalty (JumpReLU).
      target_l0: If set, JumpReLU adds ``target_l0_coeff * (L0 - target_l0)**2``.
      target_l0_coeff: Weight of the quadratic target-L0 penalty.
      jumprelu_bandwidth: Width ε of the rectangle kernel of the threshold pseudo-derivative.
      jumprelu_init_threshold: Initial value of every JumpReLU threshold.
      aux_k: Latents used by the AuxK loss (``None`` = ``2 * k``; 0 disables it).
      aux_k_coeff: Weight of the AuxK loss (TopK-style architectures).
      dead_window_tokens: A latent that has not fired for this many tokens counts as dead.
      lr: Peak learning rate of Adam.
      adam_b1, adam_b2, adam_eps: Adam hyper-parameters.
      warmup_steps: Linear learning-rate warm-up from 0 to ``lr``.
      lr_decay: "cosine" (to ``lr * lr_final_fraction`` at the last step) or "constant".
      lr_final_fraction: Final learning rate as a fraction of ``lr``.
      sparsity_warmup_steps: Linear warm-up of the sparsity coefficients (L1 / L0) from 0.
      grad_clip_norm: Global-norm gradient clipping (``None`` or 0 disables it).
      batch_size: Tokens per step.
      total_steps: Number of steps; or give ``total_tokens`` instead.
      total_tokens: Number of tokens (steps = ceil(total_tokens / batch_size)).
      seed: Seed of parameter init and any randomness of the run.
      dtype: "float32" or "bfloat16" matmuls (master weights and optimizer stay float32).
      affine_skip: Transcoders: add a learned linear skip ``x_in @ w_skip``.
      unit_norm_decoder: Keep decoder rows at unit norm (gradient projected, renormalised).
      decoder_init_norm: Norm of the initial decoder rows when ``unit_norm_decoder`` is False.
      b_dec_init: "geometric_median" (Weiszfeld iterations on the first batches), "mean", "zeros".
      normalization: "none", "unit_mean_sq_norm" (x * s, s = sqrt(d / E||x||^2)) or
        "center_unit" ((x - mean) * s); the scale is folded into exported weights.
      norm_estimation_batches: Batches used to estimate the normaliser and b_dec init.
      checkpoint_dir: Orbax checkpoint directory (``None`` disables checkpointing).
      checkpoint_every: Checkpoint interval in steps.
      keep_checkpoints: Number of most recent checkpoints kept.
      log_path: JSONL metrics file (``None`` disables it).
      log_every: Metrics are fetched, logged and shown every this many steps.
      progress_bar: Show a tqdm progress bar.
      nan_policy: "skip" (skip and count steps whose batch or gradient is not finite) or
        "error" (raise with the step index).
      model_name, site_in, site_out, corpus: Provenance strings, recorded and checked on resume.
    """

    d_in: int
    d_sae: int
    d_out: int | None = None
    architecture: str = "jumprelu"
    matryoshka_activation: str = "batchtopk"
    matryoshka_prefixes: tuple[int, ...] = ()
    k: int = 32
    sparse_topk: bool = False
    l1_coeff: float = 5.0
    l0_coeff: float = 1.0
    target_l0: float | None = None
    target_l0_coeff: float = 0.0
    jumprelu_bandwidth: float = 0.05
    jumprelu_init_threshold: float = 0.1
    aux_k: int | None = None
    aux_k_coeff: float = 1.0 / 32.0
    dead_window_tokens: int = 10_000_000
    lr: float = 3e-4
    adam_b1: float = 0.9
    adam_b2: float = 0.999
    adam_eps: float = 1e-8
    warmup_steps: int = 1000
    lr_decay: str = "cosine"
    lr_final_fraction: float = 0.1
    sparsity_warmup_steps: int = 1000
    grad_clip_norm: float | None = 1.0
    batch_size: int = 4096
    total_steps: int | None = None
    total_tokens: int | None = None
    seed: int = 0
    dtype: str = "float32"
    affine_skip: bool = False
    unit_norm_decoder: bool = True
    decoder_init_norm: float = 0.1
    b_dec_init: str = "geometric_median"
    normalization: str = "unit_mean_sq_norm"
    norm_estimation_batches: int = 8
    checkpoint_dir: str | None = None
    checkpoint_every: int = 1000
    keep_checkpoints: int = 3
    log_path: str | None = None
    log_every: int = 100
    progress_bar: bool = True
    nan_policy: str = "skip"
    model_name: str = ""
    site_in: str = ""
    site_out: str = ""
    corpus: str = ""

    def __post_init__(self):
        def choice(name: str, allowed: tuple[str, ...]):
            value = getattr(self, name)
            if value not in allowed:
                raise ValueError(f"TrainConfig.{name}={value!r}; expected one of {allowed}")

        choice("architecture", ARCHITECTURES)
        choice("matryoshka_activation", BASE_ACTIVATIONS)
        choice("normalization", NORMALIZATIONS)
        choice("dtype", DTYPES)
        choice("nan_policy", NAN_POLICIES)
        choice("b_dec_init", B_DEC_INITS)
        choice("lr_decay", ("cosine", "constant"))
        for name in ("d_in", "d_sae", "k", "batch_size", "checkpoint_every", "log_every"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"TrainConfig.{name} must be positive, got {getattr(self, name)}")
        if self.d_out is not None and self.d_out <= 0:
            raise ValueError(f"TrainConfig.d_out must be positive or None, got {self.d_out}")
        if self.total_steps is None and self.total_tokens is None:
            raise ValueError("TrainConfig needs total_steps or total_tokens")
        if self.uses_topk and self.k > self.d_sae:
            raise ValueError(f"TrainConfig.k={self.k} exceeds d_sae={self.d_sae}")
        if self.sparse_topk and self.architecture != "topk":
            raise ValueError(
                f"TrainConfig.sparse_topk needs architecture 'topk', not {self.architecture!r}"
            )
        if self.affine_skip and not self.is_transcoder:
            raise ValueError("TrainConfig.affine_skip needs a transcoder (set d_out or site_out)")
        prefixes = tuple(int(p) for p in self.matryoshka_prefixes)
        if self.architecture == "matryoshka":
            if not prefixes or prefixes[-1] != self.d_sae:
                prefixes = prefixes + (self.d_sae,)
            if (
                any(b <= a for a, b in zip((0,) + prefixes, prefixes, strict=False))
                or prefixes[-1] > self.d_sae
            ):
                raise ValueError(
                    f"TrainConfig.matryoshka_prefixes={self.matryoshka_prefixes} must increase "
                    f"strictly within (0, d_sae={self.d_sae}]"
                )
        object.__setattr__(self, "matryoshka_prefixes", prefixes)

    # ----------------------------------------------------------------- derived values
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

    @property
    def effective_aux_k(self) -> int:
        """AuxK latent count (0 when AuxK is off or the activation is not TopK-style)."""
        if not self.uses_topk:
            return 0
        value = 2 * self.k if self.aux_k is None else self.aux_k
        return min(int(value), self.d_sae)

    @property
    def num_steps(self) -> int:
        """Total optimizer steps."""
        if self.total_steps is not None:
            return int(self.total_steps)
        return math.ceil(int(self.total_tokens) / self.batch_size)

    @property
    def dead_window_steps(self) -> int:
        """``dead_window_tokens`` in steps (at least 1)."""
        return max(1, math.ceil(self.dead_window_tokens / self.batch_size))

    # ----------------------------------------------------------------- serialisation
    def to_dict(self) -> dict[str, Any]:
        """Plain dict of all fields (tuples become lists)."""
        out = dataclasses.asdict(self)
        out["matryoshka_prefixes"] = list(self.matryoshka_prefixes)
        return out

    @classmethod
    def from_dict(cls, values: dict[str, Any], *, source: str = "dict") -> TrainConfig:
        """Builds a config, rejecting unknown keys (the error names the key and ``source``)."""
        if not isinstance(values, dict):
            raise TypeError(f"TrainConfig from {source}: expected a mapping, got {type(values)}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"TrainConfig from {source}: unknown key(s) {unknown}")
        values = dict(values)
        if "matryoshka_prefixes" in values:
            values["matryoshka_prefixes"] = tuple(values["matryoshka_prefixes"] or ())
        return cls(**values)

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
        return cls.from_dict(json.loads(text), source=source)

    def to_yaml(self, path: str | os.PathLike | None = None) -> str:
        """YAML text of the config; also written atomically to ``path`` if given."""
        text = yaml.safe_dump(self.to_dict(), sort_keys=True)
        if path is not None:
            write_atomically(path, text)
        return text

    @classmethod
    def from_yaml(cls, text_or_path: str | os.PathLike) -> TrainConfig:
        """Parses YAML text, or reads it from a file path."""
        text, source = _read_text(text_or_path)
        return cls.from_dict(yaml.safe_load(text), source=source)

    def replace(self, **changes: Any) -> TrainConfig:
        """A copy with some fields changed."""
        return dataclasses.replace(self, **changes)


def _read_text(text_or_path: str | os.PathLike) -> tuple[str, str]:
    if isinstance(text_or_path, os.PathLike) or (
        isinstance(text_or_path, str) and "\n" not in text_or_path and os.path.isfile(text_or_path)
    ):
        with open(text_or_path, encoding="utf-8") as f:
            return f.read(), os.fspath(text_or_path)
    return str(text_or_path), "text"
