"""A plain-numpy Gemma 3 text decoder: the test oracle for the Penzai model.

Written from the architecture definition (checked against the Hugging Face ``transformers``
Gemma 3 modelling code), independently of ``gemma_scope_pz``'s own model code, so that the two
can be compared. It favours clarity over speed: Python loops over layers and heads.

Parameters are the canonical dictionary of ``gemma_scope_pz.models.config.param_shapes``:
projection matrices are ``[in, ...out]``, and norm scales are the effective multipliers
(already ``1 + w`` in Gemma's checkpoint convention).

The forward pass, per decoder block ``L``::

    resid_pre = x
    x = x + post_attention_norm(attention(pre_attention_norm(x)))
    mlp_in = pre_ffw_norm(x)
    mlp_out = post_ffw_norm(down(gelu_tanh(gate(mlp_in)) * up(mlp_in)))
    resid_post = x + mlp_out

with the embedding multiplied by ``sqrt(d_model)`` first, and ``final_norm`` followed by the
tied un-embedding (``x @ embedding.T``) last. No logit soft-capping.
"""

from __future__ import annotations

import math

import numpy as np

from gemma_scope_pz.models.config import Gemma3Config, param_shapes

SITE_KINDS = ("resid_pre", "attn_out", "resid_mid", "mlp_in", "mlp_out", "resid_post")


def rms_norm(x: np.ndarray, scale: np.ndarray, eps: float) -> np.ndarray:
    """``x / sqrt(mean(x**2) + eps) * scale`` over the last axis."""
    mean_square = np.mean(np.square(x), axis=-1, keepdims=True)
    return x / np.sqrt(mean_square + eps) * scale


def gelu_tanh(x: np.ndarray) -> np.ndarray:
    """The tanh approximation of GELU (``gelu_pytorch_tanh`` in transformers)."""
    return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def rope(x: np.ndarray, positions: np.ndarray, base: float) -> np.ndarray:
    """Rotary embedding in the "rotate half" layout.

    Dimension ``i < head_dim / 2`` is paired with ``i + head_dim / 2``; the pair is rotated by
    ``position * base ** (-2 i / head_dim)``.

    Args:
      x: ``[batch, seq, head_dim]``.
      positions: ``[batch, seq]`` (float; may be fractional after RoPE scaling).
      base: The RoPE wavelength.
    """
    head_dim = x.shape[-1]
    half = head_dim // 2
    inv_freq = base ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)  # [half]
    angles = positions[..., None].astype(np.float64) * inv_freq  # [batch, seq, half]
    cos = np.cos(angles).astype(x.dtype)
    sin = np.sin(angles).astype(x.dtype)
    first, second = x[..., :half], x[..., half:]
    return np.concatenate([first * cos - second * sin, second * cos + first * sin], axis=-1)


def attention_mask(seq_len: int, window: int | None) -> np.ndarray:
    """Boolean ``[query, key]`` mask: key ``j`` is visible to query ``i`` iff
    ``0 <= i - j`` and, for a sliding window, ``i - j < window``."""
    distance = np.arange(seq_len)[:, None] - np.arange(seq_len)[None, :]
    visible = distance >= 0
    if window is not None:
        visible &= distance < window
    return visible


def softmax(scores: np.ndarray, axis: int = -1) -> np.ndarray:
    shifted = scores - np.max(scores, axis=axis, keepdims=True)
    weights = np.exp(shifted)
    return weights / np.sum(weights, axis=axis, keepdims=True)


def attention(
    config: Gemma3Config,
    params: dict[str, np.ndarray],
    layer: int,
    x: np.ndarray,
    positions: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """Grouped-query self-attention of block ``layer``.

    Args:
      x: The pre-attention-norm output, ``[batch, seq, d_model]``.
      positions: ``[batch, seq]`` RoPE positions (before any global RoPE scaling).

    Returns:
      ``(attn_out, projected)``: the concatenated heads entering the output projection
      ``[batch, seq, n_heads * head_dim]`` (heads-major), and the projection's output
      ``[batch, seq, d_model]`` (before the post-attention norm).
    """
    c = config
    p = f"blocks.{layer}.attn."
    seq_len = x.shape[1]
    if c.is_global(layer):
        base, rope_positions, window = c.global_rope_base, positions / c.global_rope_scale, None
    else:
        base, rope_positions, window = c.local_rope_base, positions, c.sliding_window
    visible = attention_mask(seq_len, window)
    group_size = c.n_heads // c.n_kv_heads

    keys, values = [], []
    for kv_head in range(c.n_kv_heads):
        k = x @ params[p + "key"][:, kv_head, :]
        k = rms_norm(k, params[p + "key_norm"], c.norm_eps)
        keys.append(rope(k, rope_positions, base))
        values.append(x @ params[p + "value"][:, kv_head, :])

    head_outputs = []
    for head in range(c.n_heads):
        q = x @ params[p + "query"][:, head, :]
        q = rms_norm(q, params[p + "query_norm"], c.norm_eps)
        q = rope(q, rope_positions, base) * c.query_scale
        k, v = keys[head // group_size], values[head // group_size]
        scores = np.einsum("bqd,bkd->bqk", q, k)
        scores = scores.astype(np.promote_types(scores.dtype, np.float32))
        scores = np.where(visible[None], scores, -np.inf)
        weights = softmax(scores).astype(x.dtype)
        head_outputs.append(np.einsum("bqk,bkd->bqd", weights, v))

    attn_out = np.concatenate(head_outputs, axis=-1)
    w_out = params[p + "output"].reshape(c.n_heads * c.head_dim, c.d_model)
    return attn_out, attn_out @ w_out


def mlp(
    config: Gemma3Config, params: dict[str, np.ndarray], layer: int, x: np.ndarray
) -> np.ndarray:
    """Gated GELU feed-forward: ``down(gelu_tanh(gate(x)) * up(x))``."""
    p = f"blocks.{layer}.mlp."
    hidden = gelu_tanh(x @ params[p + "gate"]) * (x @ params[p + "up"])
    return hidden @ params[p + "down"]


def check_params(config: Gemma3Config, params: dict[str, np.ndarray]) -> None:
    """Raise ``ValueError`` naming the first missing key or wrong shape."""
    for name, shape in param_shapes(config).items():
        if name not in params:
            raise ValueError(f"parameter {name!r} is missing")
        if tuple(params[name].shape) != shape:
            raise ValueError(f"parameter {name!r} has shape {params[name].shape}, expected {shape}")


def forward_with_sites(
    config: Gemma3Config,
    params: dict[str, np.ndarray],
    tokens: np.ndarray,
    *,
    positions: np.ndarray | None = None,
    dtype: type = np.float32,
    n_blocks: int | None = None,
    compute_logits: bool = True,
) -> tuple[np.ndarray | None, dict[str, np.ndarray]]:
    """Run the decoder and record every intermediate site.

    Args:
      config: Model hyper-parameters.
      params: Canonical parameter dictionary.
      tokens: Integer token ids ``[batch, seq]``.
      positions: Optional ``[batch, seq]`` RoPE positions (default ``0..seq-1``). The attention
        mask always uses sequence indices.
      dtype: Compute dtype (``np.float32`` or ``np.float64``); softmax is float32 at least.
      n_blocks: Run only the first ``n_blocks`` blocks (default: all). Logits are then computed
        from the last block run.
      compute_logits: Skip the (large) un-embedding when False; logits are then ``None``.

    Returns:
      ``(logits [batch, seq, vocab] float32 or None, sites)``, where ``sites`` maps
      ``"blocks.{L}.{kind}"`` for kind in ``SITE_KINDS`` to ``[batch, seq, width]`` arrays
      (``attn_out`` is the input of the output projection, ``resid_mid`` the residual between
      attention and MLP, ``mlp_in`` the pre-FFW norm output, ``mlp_out`` the post-FFW norm
      output), plus ``"embed"`` (the scaled embedding) and ``"final_norm"``.
    """
    tokens = np.asarray(tokens)
    if tokens.ndim != 2 or not np.issubdtype(tokens.dtype, np.integer):
        raise ValueError(
            f"tokens must be an integer array [batch, seq], got {tokens.dtype}{tokens.shape}"
        )
    if tokens.size and (tokens.min() < 0 or tokens.max() >= config.vocab_size):
        raise ValueError(
            f"token ids must lie in [0, {config.vocab_size}), got {tokens.min()}..{tokens.max()}"
        )
    check_params(config, params)
    c = config
    params = {name: np.asarray(value, dtype=dtype) for name, value in params.items()}
    batch, seq_len = tokens.shape
    if positions is None:
        positions = np.broadcast_to(np.arange(seq_len), (batch, seq_len))
    positions = np.asarray(positions, dtype=np.float64)
    n_blocks = c.n_layers if n_blocks is None else n_blocks

    sites: dict[str, np.ndarray] = {}
    x = params["embedding"][tokens] * np.asarray(math.sqrt(c.d_model), dtype=dtype)
    sites["embed"] = x
    for layer in range(n_blocks):
        p = f"blocks.{layer}."
        sites[p + "resid_pre"] = x
        normed = rms_norm(x, params[p + "pre_attention_norm"], c.norm_eps)
        attn_out, projected = attention(c, params, layer, normed, positions)
        sites[p + "attn_out"] = attn_out
        x = x + rms_norm(projected, params[p + "post_attention_norm"], c.norm_eps)
        sites[p + "resid_mid"] = x
        mlp_in = rms_norm(x, params[p + "pre_ffw_norm"], c.norm_eps)
        sites[p + "mlp_in"] = mlp_in
        mlp_out = rms_norm(mlp(c, params, layer, mlp_in), params[p + "post_ffw_norm"], c.norm_eps)
        sites[p + "mlp_out"] = mlp_out
        x = x + mlp_out
        sites[p + "resid_post"] = x

    x = rms_norm(x, params["final_norm"], c.norm_eps)
    sites["final_norm"] = x
    logits = (x @ params["embedding"].T).astype(np.float32) if compute_logits else None
    return logits, sites


def forward(
    config: Gemma3Config,
    params: dict[str, np.ndarray],
    tokens: np.ndarray,
    *,
    return_hidden: bool = False,
    positions: np.ndarray | None = None,
    dtype: type = np.float32,
) -> np.ndarray | tuple[np.ndarray, list[np.ndarray]]:
    """Logits ``[batch, seq, vocab]`` (float32) of the Gemma 3 decoder.

    With ``return_hidden=True`` returns ``(logits, hidden)`` where ``hidden[L]`` is the
    ``resid_post`` of block ``L`` (``[batch, seq, d_model]``). See ``forward_with_sites`` for
    ``positions`` and ``dtype``.
    """
    logits, sites = forward_with_sites(config, params, tokens, positions=positions, dtype=dtype)
    if not return_hidden:
        return logits
    return logits, [sites[f"blocks.{layer}.resid_post"] for layer in range(config.n_layers)]


def random_params(
    config: Gemma3Config, seed: int = 0, dtype: type = np.float32
) -> dict[str, np.ndarray]:
    """Random canonical parameters of a plausible scale (norm scales near 1), for tests."""
    rng = np.random.default_rng(seed)
    params = {}
    for name, shape in param_shapes(config).items():
        if name.endswith("norm"):
            params[name] = 1.0 + 0.1 * rng.standard_normal(shape)
        elif name == "embedding":
            params[name] = rng.standard_normal(shape) / math.sqrt(config.d_model)
        else:
            fan_in = shape[0] if not name.endswith("attn.output") else shape[0] * shape[1]
            params[name] = rng.standard_normal(shape) / math.sqrt(fan_in)
    return {name: value.astype(dtype) for name, value in params.items()}
