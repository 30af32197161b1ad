"""Streaming max-activating examples and firing counters for SAE latents.

`MaxActivatingExamples` is a pytree that holds, for every latent (feature), the
``k`` contexts (rows of a token batch) on which that latent reached its highest
activation, together with a window of tokens around the peak and the latent's
activations over that window.  It also accumulates the counters needed for
per-feature statistics (see `gemma_scope_pz.analysis.stats`).

The state is updated one batch at a time by a single jitted function: the
batch's latents are reduced to one peak per (context, feature), concatenated
with the running top-k and re-ranked with `jax.lax.top_k`, vectorised over all
features.  Only the kept windows are stored, so memory is
``O(n_features * k * window)`` regardless of the corpus size.
"""

from __future__ import annotations

import dataclasses
import resource
import time
from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from penzai import pz
from tqdm.auto import tqdm

from gemma_scope_pz.scope.tokens import token_mask


@dataclasses.dataclass(frozen=True, eq=False)  # holds numpy arrays
class Example:
    """One max-activating context of one feature, on the host.

    Attributes:
      value: The feature's peak activation in this context.
      row: Global row (context) id: ``row_offset`` of its batch plus its batch index.
      position: Position of the peak token within the row.
      window_tokens: Token ids around the peak, clipped to the row's edges (int32).
      window_values: The feature's activation at each window token (0 where the
        token was masked out, e.g. BOS or padding).
      peak_index: Index of the peak token inside ``window_tokens``.
    """

    value: float
    row: int
    position: int
    window_tokens: np.ndarray
    window_values: np.ndarray
    peak_index: int


@pz.pytree_dataclass
class MaxActivatingExamples(pz.Struct):
    """Running top-k contexts per feature plus firing counters (a JAX pytree).

    Build with `create`, feed batches with `update` (functional: it returns a new
    state), read results with `top`.  ``k`` and the window half-width are implied
    by the array shapes.  Counters are int32, so a single state supports up to
    2**31 - 1 valid tokens.

    Attributes:
      values: [n_features, k] peak activation of each kept context, best first
        (``-inf`` for empty slots).
      rows: [n_features, k] global row id of each kept context (-1 when empty).
      positions: [n_features, k] position of the peak within its row.
      window_tokens: [n_features, k, 2*window+1] tokens around the peak; -1 where
        the window runs past the row's edges.
      window_values: [n_features, k, 2*window+1] the feature's activations over
        the window (0 at masked or out-of-row positions).
      fire_counts: [n_features] number of valid tokens with activation > 0.
      activation_sums: [n_features] sum of activations over those tokens.
      sums_compensation: [n_features] Kahan compensation term of ``activation_sums``.
      max_activation: [n_features] largest activation seen on a valid token.
      n_tokens: scalar, number of valid tokens seen.
      n_rows: scalar, number of rows (contexts) seen.
    """

    values: jax.Array
    rows: jax.Array
    positions: jax.Array
    window_tokens: jax.Array
    window_values: jax.Array
    fire_counts: jax.Array
    activation_sums: jax.Array
    sums_compensation: jax.Array
    max_activation: jax.Array
    n_tokens: jax.Array
    n_rows: jax.Array

    @classmethod
    def create(cls, n_features: int, k: int = 10, window: int = 8) -> MaxActivatingExamples:
        """Empty state for ``n_features`` latents, keeping ``k`` contexts with ±``window`` tokens."""
        if n_features < 1 or k < 1 or window < 0:
            raise ValueError(
                f"MaxActivatingExamples.create: need n_features >= 1, k >= 1, window >= 0; "
                f"got n_features={n_features}, k={k}, window={window}"
            )
        width = 2 * window + 1
        return cls(
            values=jnp.full((n_features, k), -jnp.inf, jnp.float32),
            rows=jnp.full((n_features, k), -1, jnp.int32),
            positions=jnp.full((n_features, k), -1, jnp.int32),
            window_tokens=jnp.full((n_features, k, width), -1, jnp.int32),
            window_values=jnp.zeros((n_features, k, width), jnp.float32),
            fire_counts=jnp.zeros((n_features,), jnp.int32),
            activation_sums=jnp.zeros((n_features,), jnp.float32),
            sums_compensation=jnp.zeros((n_features,), jnp.float32),
            max_activation=jnp.full((n_features,), -jnp.inf, jnp.float32),
            n_tokens=jnp.zeros((), jnp.int32),
            n_rows=jnp.zeros((), jnp.int32),
        )

    @property
    def n_features(self) -> int:
        return self.values.shape[0]

    @property
    def k(self) -> int:
        return self.values.shape[1]

    @property
    def window(self) -> int:
        return (self.window_tokens.shape[2] - 1) // 2

    def update(
        self,
        tokens: Any,
        latents: Any,
        mask: Any | None = None,
        row_offset: int | jax.Array = 0,
    ) -> MaxActivatingExamples:
        """Returns the state after seeing one batch.

        Args:
          tokens: int [B, T] token ids.
          latents: float [B, T, n_features] activations (any float dtype), or a penzai
            NamedArray with axes "batch", "seq" and "latents".
          mask: bool [B, T], True at positions that count (BOS and padding False).
            Defaults to `gemma_scope_pz.scope.tokens.token_mask(tokens)`.
          row_offset: global id of the batch's first row; rows get ``row_offset + b``.
        """
        latents = _as_positional_latents(latents)
        tokens = jnp.asarray(tokens)
        if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
            raise ValueError(
                f"update: tokens must be an int [batch, seq] array, got {tokens.dtype}{tokens.shape}"
            )
        if latents.ndim != 3 or latents.shape[:2] != tokens.shape:
            raise ValueError(
                f"update: latents shape {latents.shape} must be [batch, seq, features] with "
                f"[batch, seq] = tokens shape {tokens.shape}"
            )
        if latents.shape[2] != self.n_features:
            raise ValueError(
                f"update: latents have {latents.shape[2]} features, state has {self.n_features}"
            )
        mask = token_mask(tokens) if mask is None else jnp.asarray(mask)
        if mask.shape != tokens.shape:
            raise ValueError(f"update: mask shape {mask.shape} != tokens shape {tokens.shape}")
        return _update(
            self,
            tokens.astype(jnp.int32),
            latents,
            mask.astype(bool),
            jnp.asarray(row_offset, jnp.int32),
        )

    def top(self, feature: int, only_active: bool = True) -> list[Example]:
        """The kept contexts of ``feature``, best first, copied to the host.

        Args:
          feature: latent index.
          only_active: drop contexts whose peak is <= 0 (the feature did not fire).
        """
        if not 0 <= feature < self.n_features:
            raise IndexError(f"top: feature {feature} out of range [0, {self.n_features})")
        values, rows, positions, tokens, acts = jax.device_get(
            (
                self.values[feature],
                self.rows[feature],
                self.positions[feature],
                self.window_tokens[feature],
                self.window_values[feature],
            )
        )
        out = []
        for i in range(values.shape[0]):
            value = float(values[i])
            if not np.isfinite(value) or (only_active and value <= 0):
                continue
            in_row = tokens[i] >= 0
            first = int(np.argmax(in_row))
            out.append(
                Example(
                    value=value,
                    row=int(rows[i]),
                    position=int(positions[i]),
                    window_tokens=tokens[i][in_row],
                    window_values=acts[i][in_row],
                    peak_index=self.window - first,
                )
            )
        return out


def _as_positional_latents(latents: Any) -> jax.Array:
    """Accepts a plain array or a NamedArray with batch/seq/latents axes."""
    if isinstance(latents, pz.nx.NamedArray | pz.nx.NamedArrayView):
        names = set(latents.named_shape)
        if names != {"batch", "seq", "latents"} or latents.positional_shape:
            raise ValueError(
                f"update: named latents must have exactly axes batch, seq, latents; got "
                f"named {dict(latents.named_shape)} positional {latents.positional_shape}"
            )
        return latents.unwrap("batch", "seq", "latents")
    return jnp.asarray(latents)


def _context_peaks(latents: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Peak position and value of every (context, feature), [B, F] each; -inf for masked rows.

    One pass (argmax); the peak values are then gathered.
    """
    masked = jnp.where(mask[:, :, None], latents, -jnp.inf)
    argmax = masked.argmax(axis=1).astype(jnp.int32)
    peak = jnp.where(
        jnp.take_along_axis(mask, argmax, axis=1),
        jnp.take_along_axis(latents, argmax[:, None, :], axis=1)[:, 0],
        -jnp.inf,
    )
    return argmax, peak


def _windows(tokens, latents, mask, batch_row, peak_pos, half: int):
    """Tokens and activations ±``half`` around each selected peak: [F, k, 2*half+1] each."""
    seq, n_features = latents.shape[1], latents.shape[2]
    offsets = jnp.arange(-half, half + 1, dtype=jnp.int32)
    pos = peak_pos[:, :, None] + offsets  # [F, k, W]
    in_row = (pos >= 0) & (pos < seq)
    pos_c = jnp.clip(pos, 0, seq - 1)
    b3 = batch_row[:, :, None]
    feature_ids = jnp.arange(n_features, dtype=jnp.int32)[:, None, None]
    new_tokens = jnp.where(in_row, tokens[b3, pos_c], -1)
    new_values = jnp.where(in_row & mask[b3, pos_c], latents[b3, pos_c, feature_ids], 0.0)
    return new_tokens, new_values


def _firing_sums(latents, mask) -> tuple[jax.Array, jax.Array]:
    """Per-feature count of counted tokens with activation > 0 and their activation sum.

    Mask-weighted matrix-vector products (faster than masked reductions on CPU). HIGHEST
    precision: no TF32 rounding on GPUs. Counts are exact while one batch has < 2**24 tokens.
    """
    batch, seq, n_features = latents.shape
    flat = latents.reshape(batch * seq, n_features)
    weights = mask.reshape(batch * seq).astype(jnp.float32)
    highest = jax.lax.Precision.HIGHEST
    counts = jnp.dot(weights, (flat > 0).astype(jnp.float32), precision=highest)
    return counts, jnp.dot(weights, jnp.maximum(flat, 0.0), precision=highest)


@jax.jit
def _update(
    state: MaxActivatingExamples,
    tokens: jax.Array,
    latents: jax.Array,
    mask: jax.Array,
    row_offset: jax.Array,
) -> MaxActivatingExamples:
    """One streaming step (see `MaxActivatingExamples.update`)."""
    latents = latents.astype(jnp.float32)
    batch = latents.shape[0]
    k = state.values.shape[1]
    context_argmax, context_max = _context_peaks(latents, mask)

    # Re-rank running top-k together with this batch's peaks, per feature.
    candidates = jnp.concatenate([state.values, context_max.T], axis=1)  # [F, k + B]
    top_values, top_index = jax.lax.top_k(candidates, k)  # [F, k]
    from_batch = top_index >= k
    batch_row = jnp.clip(top_index - k, 0, batch - 1)
    kept_slot = jnp.clip(top_index, 0, k - 1)
    peak_pos = jnp.take_along_axis(context_argmax.T, batch_row, axis=1)  # [F, k]
    half = (state.window_tokens.shape[2] - 1) // 2
    new_tokens, new_values = _windows(tokens, latents, mask, batch_row, peak_pos, half)

    def pick(new, old):
        old = jnp.take_along_axis(
            old, kept_slot.reshape(kept_slot.shape + (1,) * (old.ndim - 2)), axis=1
        )
        cond = from_batch.reshape(from_batch.shape + (1,) * (old.ndim - 2))
        return jnp.where(cond, new, old)

    batch_counts, batch_sums = _firing_sums(latents, mask)
    # Kahan summation keeps float32 sums accurate over long corpora.
    y = batch_sums - state.sums_compensation
    new_sums = state.activation_sums + y
    return MaxActivatingExamples(
        values=top_values,
        rows=pick(row_offset + batch_row, state.rows),
        positions=pick(peak_pos, state.positions),
        window_tokens=pick(new_tokens, state.window_tokens),
        window_values=pick(new_values, state.window_values),
        fire_counts=state.fire_counts + jnp.round(batch_counts).astype(jnp.int32),
        activation_sums=new_sums,
        sums_compensation=(new_sums - state.activation_sums) - y,
        max_activation=jnp.maximum(state.max_activation, context_max.max(axis=0)),
        n_tokens=state.n_tokens + mask.sum(dtype=jnp.int32),
        n_rows=state.n_rows + batch,
    )


def collect_max_activating(
    batches: Iterable[tuple[Any, Any]],
    encode_fn: Callable[[jax.Array], Any],
    n_features: int,
    k: int = 10,
    window: int = 8,
    *,
    total: int | None = None,
    progress: bool = True,
) -> MaxActivatingExamples:
    """Streams ``(tokens, mask)`` batches through ``encode_fn`` and collects examples.

    Args:
      batches: iterable of ``(tokens [B, T], mask [B, T] or None)``.
      encode_fn: maps tokens to latents [B, T, n_features] (e.g. model + SAE encoder).
      n_features: number of latents.
      k: contexts kept per feature.
      window: tokens kept on each side of the peak.
      total: number of batches for the progress bar (default: ``len(batches)`` if defined).
      progress: show a tqdm progress bar.

    Returns:
      The final `MaxActivatingExamples`; rows are numbered consecutively over batches.
    """
    state = MaxActivatingExamples.create(n_features, k=k, window=window)
    if total is None and hasattr(batches, "__len__"):
        total = len(batches)  # type: ignore[arg-type]
    row_offset = 0
    for tokens, mask in tqdm(batches, total=total, disable=not progress, desc="max-activating"):
        tokens = jnp.asarray(tokens)
        state = state.update(tokens, encode_fn(tokens), mask, row_offset)
        row_offset += int(tokens.shape[0])
    return state


def benchmark_update(
    n_features: int = 16384,
    k: int = 10,
    window: int = 8,
    batch: int = 8,
    seq: int = 128,
    steps: int = 5,
    seed: int = 0,
) -> dict[str, float]:
    """Times `MaxActivatingExamples.update` on random sparse latents; returns numbers.

    Reports the compile time, the mean step time after compilation, the state's
    size, one batch of latents' size, XLA's temporary-buffer estimate for the
    step (when the backend provides it) and the process's peak RSS.
    """
    key_tokens, key_latents = jax.random.split(jax.random.key(seed))
    tokens = jax.random.randint(key_tokens, (batch, seq), 3, 1000, jnp.int32)
    mask = jnp.ones((batch, seq), bool).at[:, 0].set(False)
    raw = jax.random.normal(key_latents, (batch, seq, n_features), jnp.float32)
    latents = jnp.maximum(raw - 2.0, 0.0)  # ~2% density
    state = MaxActivatingExamples.create(n_features, k=k, window=window)
    row = jnp.asarray(0, jnp.int32)

    t0 = time.perf_counter()
    compiled = _update.lower(state, tokens, latents, mask, row).compile()
    compile_s = time.perf_counter() - t0
    temp_bytes = float("nan")
    try:
        analysis = compiled.memory_analysis()
        if analysis is not None:
            temp_bytes = float(analysis.temp_size_in_bytes)
    except Exception:  # noqa: BLE001 - not every backend implements it
        pass

    state = jax.block_until_ready(state.update(tokens, latents, mask, 0))
    t0 = time.perf_counter()
    for i in range(steps):
        state = state.update(tokens, latents, mask, (i + 1) * batch)
    jax.block_until_ready(state)
    step_s = (time.perf_counter() - t0) / steps
    state_bytes = sum(x.nbytes for x in jax.tree_util.tree_leaves(state))
    return {
        "n_features": n_features,
        "k": k,
        "window": window,
        "batch": batch,
        "seq": seq,
        "compile_s": compile_s,
        "step_s": step_s,
        "tokens_per_s": batch * seq / step_s,
        "state_mb": state_bytes / 2**20,
        "latents_batch_mb": latents.nbytes / 2**20,
        "xla_temp_mb": temp_bytes / 2**20,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


if __name__ == "__main__":
    print(benchmark_update())
