"""The four sections of a training config: the dictionary, its loss, the optimiser, the run.

Each section is a frozen dataclass whose fields carry their help in ``metadata["help"]`` and their
range (see :mod:`~gemma_scope_pz.train.config_values`); values are converted to the annotated types
and checked when a section is built. :class:`~gemma_scope_pz.train.config.TrainConfig` groups them.
Import them from ``gemma_scope_pz.train.config``.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from typing import Literal

from gemma_scope_pz.train.config_values import convert_fields, field

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
      sparse_jumprelu, sparse_cap: the sparse JumpReLU decode (an implementation choice).
      jumprelu_init_threshold, affine_skip, unit_norm_decoder, decoder_init_norm, b_dec_init,
      b_enc_init:
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
    sparse_jumprelu: Literal["auto", "on", "off"] = field(
        "auto",
        "JumpReLU: decode each row from its capped active set (gathered decoder rows) with an "
        "exact dense fallback for batches where a row exceeds the cap; auto: on the CPU, when an "
        "expected L0 is known (loss.target_l0 or sae.sparse_cap) and the cap is at most d_sae / 128 "
        "(dense on accelerators, where the gathers are slower). Loss and gradients equal the "
        "dense path's.",
        operational=True,
    )
    sparse_cap: int | None = field(
        None,
        "Per-row active-set capacity of the sparse JumpReLU path (None: max(64, 4 * "
        "loss.target_l0)).",
        minimum=1,
        operational=True,
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
    b_enc_init: Literal["centre", "zeros"] = field(
        "centre",
        "Initial b_enc: centre (-c @ w_enc, with c the inputs' centre estimated as b_dec_init "
        "says, so the encoder first sees centred inputs) or zeros (the default before issue 14).",
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
        if self.sparse_jumprelu == "on" and self.architecture != "jumprelu":
            raise ValueError(
                f"sae.sparse_jumprelu='on' needs architecture 'jumprelu', not {self.architecture!r}"
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
      aux_k, aux_k_coeff, dead_preact_coeff, dead_window_tokens: the losses on dead latents
        (AuxK; the JumpReLU pre-activation loss).
      frequency_coeff, max_firing_fraction: the penalty on latents that fire too often.
      sparsity_warmup_steps: linear warm-up of the sparsity coefficients.
    """

    l1_coeff: float = field(
        5.0, "Weight of the decoder-norm-weighted L1 penalty (relu).", minimum=0
    )
    l0_coeff: float = field(
        2.0, "Weight of the L0 penalty (jumprelu; 1.0 before issue 14).", minimum=0
    )
    target_l0: float | None = field(
        None, "If set, jumprelu adds target_l0_coeff * (L0 - target_l0)^2.", minimum=0
    )
    target_l0_coeff: float = field(0.0, "Weight of the quadratic target-L0 penalty.", minimum=0)
    jumprelu_bandwidth: float = field(
        0.05, "Width of the rectangle kernel of the threshold pseudo-derivative.", positive=True
    )
    aux_k: int | None = field(
        None, "Latents used by AuxK (None: 2 * k for TopK-style, 32 for JumpReLU).", minimum=0
    )
    aux_k_coeff: float = field(
        1.0 / 32.0, "Weight of the AuxK loss (TopK-style and JumpReLU; 0 disables it).", minimum=0
    )
    dead_preact_coeff: float = field(
        1e-3,
        "Weight of the pre-activation loss raising dead JumpReLU latents to their thresholds.",
        minimum=0,
    )
    dead_window_tokens: int | None = field(
        None,
        "A latent silent for this many tokens counts as dead (None: a twentieth of the run, "
        "at most 10M).",
        minimum=1,
    )
    frequency_coeff: float = field(
        0.0,
        "Weight of the penalty on latents firing on more than max_firing_fraction of a batch.",
        minimum=0,
    )
    max_firing_fraction: float = field(
        0.5, "Firing fraction above which the frequency penalty applies.", positive=True, maximum=1
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
