"""Gemma 2 and Gemma 3 text-model configuration and the released presets.

One dataclass describes both generations: Gemma 2 is a Gemma 3 without QK-norm, with tanh
soft-capping of the attention and final logits, one RoPE base and every other layer global.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

# The order of the five released Gemma 3 text models, smallest first.
PRESET_NAMES = ("270m", "1b", "4b", "12b", "27b")
# The released Gemma 2 models (base and -it share a configuration).
GEMMA2_PRESET_NAMES = ("gemma2-2b", "gemma2-9b", "gemma2-27b")
FAMILIES = ("gemma2", "gemma3")


@dataclasses.dataclass(frozen=True)
class Gemma3Config:
    """Hyper-parameters of a Gemma 3 (or Gemma 2) text decoder.

    Attributes:
      vocab_size: Number of tokens in the (tied) embedding table.
      d_model: Width of the residual stream ("embedding" axis).
      n_layers: Number of decoder blocks.
      n_heads: Number of query heads.
      n_kv_heads: Number of key/value heads (grouped-query attention).
      head_dim: Width of each query/key/value head ("projection" axis).
      d_ff: Hidden width of the gated-GELU MLP ("neurons" axis).
      sliding_window: Number of positions a local layer attends to, itself included.
      query_pre_attn_scalar: Queries are scaled by ``query_pre_attn_scalar ** -0.5``.
      local_rope_base: RoPE wavelength of sliding-window layers.
      global_rope_base: RoPE wavelength of global layers.
      global_rope_scale: Positions of global layers are divided by this (linear RoPE scaling).
      sliding_window_pattern: Every ``pattern``-th layer is global, the others local.
      norm_eps: Epsilon of every RMSNorm.
      max_seq_len: Longest context the checkpoint was trained for.
      name: Preset name ("270m", "gemma2-2b", ...) or a free-form label.
      family: "gemma3" or "gemma2" (which released models the checkpoint belongs to).
      qk_norm: Whether queries and keys pass an RMSNorm before RoPE (Gemma 3 yes, Gemma 2 no).
      attn_logit_softcap: If set, attention logits become ``cap * tanh(logits / cap)`` before
        the mask (Gemma 2: 50).
      final_logit_softcap: If set, the output logits are soft-capped the same way (Gemma 2: 30).
    """

    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    d_ff: int
    sliding_window: int
    query_pre_attn_scalar: float
    local_rope_base: float = 10_000.0
    global_rope_base: float = 1_000_000.0
    global_rope_scale: float = 1.0
    sliding_window_pattern: int = 6
    norm_eps: float = 1e-6
    max_seq_len: int = 32_768
    name: str = "custom"
    family: str = "gemma3"
    qk_norm: bool = True
    attn_logit_softcap: float | None = None
    final_logit_softcap: float | None = None

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ValueError(f"Gemma3Config.family must be one of {FAMILIES}, got {self.family!r}")
        for field in ("attn_logit_softcap", "final_logit_softcap"):
            cap = getattr(self, field)
            if cap is not None and not cap > 0:
                raise ValueError(f"Gemma3Config.{field} must be positive or None, got {cap}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}"
            )
        for field in ("vocab_size", "d_model", "n_layers", "n_heads", "head_dim", "d_ff"):
            if getattr(self, field) <= 0:
                raise ValueError(
                    f"Gemma3Config.{field} must be positive, got {getattr(self, field)}"
                )
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for RoPE, got {self.head_dim}")

    def is_global(self, layer: int) -> bool:
        """Whether decoder block ``layer`` uses global (full causal) attention."""
        return (layer + 1) % self.sliding_window_pattern == 0

    @property
    def query_scale(self) -> float:
        return float(self.query_pre_attn_scalar) ** -0.5

    @property
    def attn_width(self) -> int:
        """Width of the concatenated heads entering the attention output projection."""
        return self.n_heads * self.head_dim

    @classmethod
    def preset(cls, name: str) -> Gemma3Config:
        """A released text model: Gemma 3 "270m" … "27b" or Gemma 2 "gemma2-2b/9b/27b".

        "gemma-2-2b", "gemma-2-9b-it" and the like name the same Gemma 2 configurations.
        """
        key = name.lower().removeprefix("google/").removesuffix("-it")
        key = key.removeprefix("gemma3-").removeprefix("gemma-3-").replace("gemma-2-", "gemma2-")
        if key in _GEMMA2_PRESETS:
            return cls(name=key, **_GEMMA2_COMMON, **_GEMMA2_PRESETS[key])
        if key not in _PRESETS:
            raise ValueError(
                f"Unknown preset {name!r}; choose one of {PRESET_NAMES + GEMMA2_PRESET_NAMES}"
            )
        return cls(name=key, **_PRESETS[key])

    @classmethod
    def tiny(cls, **overrides: Any) -> Gemma3Config:
        """A few-layer random-weights configuration for tests and fixtures.

        ``family="gemma2"`` gives a Gemma 2 one (no QK-norm, soft-caps, every other layer global).
        """
        kwargs: dict[str, Any] = dict(
            vocab_size=64,
            d_model=32,
            n_layers=6,
            n_heads=4,
            n_kv_heads=2,
            head_dim=16,
            d_ff=48,
            sliding_window=4,
            query_pre_attn_scalar=16,
            max_seq_len=128,
            name="tiny",
        )
        if overrides.get("family") == "gemma2":
            gemma2 = {k: v for k, v in _GEMMA2_COMMON.items() if k not in kwargs}
            kwargs.update(gemma2, name="tiny-gemma2")
        kwargs.update(overrides)
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Gemma3Config:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"Unknown Gemma3Config fields: {sorted(unknown)}")
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


_PRESETS: dict[str, dict[str, Any]] = {
    "270m": dict(
        vocab_size=262_144,
        d_model=640,
        n_layers=18,
        n_heads=4,
        n_kv_heads=1,
        head_dim=256,
        d_ff=2048,
        sliding_window=512,
        query_pre_attn_scalar=256,
    ),
    "1b": dict(
        vocab_size=262_144,
        d_model=1152,
        n_layers=26,
        n_heads=4,
        n_kv_heads=1,
        head_dim=256,
        d_ff=6912,
        sliding_window=512,
        query_pre_attn_scalar=256,
    ),
    "4b": dict(
        vocab_size=262_208,
        d_model=2560,
        n_layers=34,
        n_heads=8,
        n_kv_heads=4,
        head_dim=256,
        d_ff=10240,
        sliding_window=1024,
        query_pre_attn_scalar=256,
        global_rope_scale=8.0,
        max_seq_len=131_072,
    ),
    "12b": dict(
        vocab_size=262_208,
        d_model=3840,
        n_layers=48,
        n_heads=16,
        n_kv_heads=8,
        head_dim=256,
        d_ff=15360,
        sliding_window=1024,
        query_pre_attn_scalar=256,
        global_rope_scale=8.0,
        max_seq_len=131_072,
    ),
    "27b": dict(
        vocab_size=262_208,
        d_model=5376,
        n_layers=62,
        n_heads=32,
        n_kv_heads=16,
        head_dim=128,
        d_ff=21504,
        sliding_window=1024,
        query_pre_attn_scalar=168,
        global_rope_scale=8.0,
        max_seq_len=131_072,
    ),
}


# Shared by every Gemma 2 model (transformers' Gemma2Config / the gemma library's Gemma 2 configs).
_GEMMA2_COMMON: dict[str, Any] = dict(
    family="gemma2",
    qk_norm=False,
    attn_logit_softcap=50.0,
    final_logit_softcap=30.0,
    vocab_size=256_000,
    sliding_window=4096,
    sliding_window_pattern=2,  # local, global, local, global, ...
    local_rope_base=10_000.0,
    global_rope_base=10_000.0,
    max_seq_len=8192,
)
_GEMMA2_PRESETS: dict[str, dict[str, Any]] = {
    "gemma2-2b": dict(
        d_model=2304,
        n_layers=26,
        n_heads=8,
        n_kv_heads=4,
        head_dim=256,
        d_ff=9216,
        query_pre_attn_scalar=256,
    ),
    "gemma2-9b": dict(
        d_model=3584,
        n_layers=42,
        n_heads=16,
        n_kv_heads=8,
        head_dim=256,
        d_ff=14336,
        query_pre_attn_scalar=256,
    ),
    "gemma2-27b": dict(  # queries scaled by (d_model / n_heads) ** -0.5, not head_dim
        d_model=4608,
        n_layers=46,
        n_heads=32,
        n_kv_heads=16,
        head_dim=128,
        d_ff=36864,
        query_pre_attn_scalar=144,
    ),
}


def param_shapes(config: Gemma3Config) -> dict[str, tuple[int, ...]]:
    """The canonical parameter dictionary's keys and shapes (see ``models/checkpoints.py``).

    Gemma 2 (``qk_norm=False``) has no ``attn.query_norm`` / ``attn.key_norm``. Norm scales are
    stored as the effective multiplier, i.e. already ``1 + w`` in Gemma's
    convention. Query head ``h`` belongs to key/value head ``h // (n_heads // n_kv_heads)``.
    """
    c = config
    shapes: dict[str, tuple[int, ...]] = {
        "embedding": (c.vocab_size, c.d_model),
        "final_norm": (c.d_model,),
    }
    for i in range(c.n_layers):
        p = f"blocks.{i}."
        for norm in ("pre_attention_norm", "post_attention_norm", "pre_ffw_norm", "post_ffw_norm"):
            shapes[p + norm] = (c.d_model,)
        if c.qk_norm:
            shapes[p + "attn.query_norm"] = (c.head_dim,)
            shapes[p + "attn.key_norm"] = (c.head_dim,)
        shapes[p + "attn.query"] = (c.d_model, c.n_heads, c.head_dim)
        shapes[p + "attn.key"] = (c.d_model, c.n_kv_heads, c.head_dim)
        shapes[p + "attn.value"] = (c.d_model, c.n_kv_heads, c.head_dim)
        shapes[p + "attn.output"] = (c.n_heads, c.head_dim, c.d_model)
        shapes[p + "mlp.gate"] = (c.d_model, c.d_ff)
        shapes[p + "mlp.up"] = (c.d_model, c.d_ff)
        shapes[p + "mlp.down"] = (c.d_ff, c.d_model)
    return shapes
