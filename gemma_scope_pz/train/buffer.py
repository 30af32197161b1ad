"""The on-device ring shuffle buffer of streaming training: activation rows that never leave the device.

The buffer holds ``n_chunks`` chunks of ``chunk_rows`` rows per site (all sites share the slots, so a
transcoder's ``mlp_in`` and ``mlp_out`` rows stay aligned). Each refill overwrites the oldest chunk with
the activations of one batch of contexts; each training step draws ``batch_size`` distinct valid
slots uniformly from the whole buffer, so a batch mixes tokens of many contexts from several refills::

    buffer = init_buffer({"blocks.9.resid_post": 640}, n_chunks=8, chunk_rows=4096)
    buffer, n_bad = write_chunk(buffer, 3, {"blocks.9.resid_post": rows}, valid)
    idx = draw_slots(buffer["valid"], seed=0, step=17, batch_size=4096)
    x = take_rows(buffer, "blocks.9.resid_post", idx)

A slot is valid when it holds a document token (not BOS, not padding) whose activations are finite at
every site. Rows with a non-finite value are counted (``write_chunk``'s second output) and never drawn.
The draw is a pure function of ``(seed, step, valid)``: Gumbel top-k over the valid slots.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

Buffer = dict  # {"rows": {site: float32 [capacity, width]}, "valid": bool [capacity]}


def init_buffer(widths: dict[str, int], n_chunks: int, chunk_rows: int) -> Buffer:
    """An empty buffer (no valid slot) of ``n_chunks * chunk_rows`` rows per site."""
    capacity = int(n_chunks) * int(chunk_rows)
    return {
        "rows": {site: jnp.zeros((capacity, int(w)), jnp.float32) for site, w in widths.items()},
        "valid": jnp.zeros((capacity,), bool),
    }


def buffer_bytes(widths: dict[str, int], capacity: int) -> int:
    """Device bytes of a buffer of ``capacity`` rows at these sites (float32 rows + valid flags)."""
    return int(capacity) * (4 * sum(int(w) for w in widths.values()) + 1)


def write_chunk(
    buffer: Buffer, chunk: jax.Array, rows: dict[str, jax.Array], valid: jax.Array
) -> tuple[Buffer, jax.Array]:
    """Overwrites chunk ``chunk`` with ``rows`` ``{site: [chunk_rows, width]}``.

    Args:
      buffer: The buffer.
      chunk: Index of the chunk (a traced int).
      rows: One array per buffer site.
      valid: ``[chunk_rows]`` bool, True at document tokens.

    Returns:
      The new buffer and the number of document rows dropped for non-finite values (int32).
    """
    finite = jnp.ones(valid.shape, bool)
    for site in buffer["rows"]:
        finite &= jnp.all(jnp.isfinite(rows[site]), axis=-1)
    start = chunk * valid.shape[0]
    new_rows = {
        site: jax.lax.dynamic_update_slice(
            old, jnp.where(finite[:, None], rows[site].astype(jnp.float32), 0.0), (start, 0)
        )
        for site, old in buffer["rows"].items()
    }
    new_valid = jax.lax.dynamic_update_slice(buffer["valid"], valid & finite, (start,))
    n_bad = jnp.sum(valid & ~finite).astype(jnp.int32)
    return {"rows": new_rows, "valid": new_valid}, n_bad


def draw_slots(valid: jax.Array, seed: int, step, batch_size: int) -> jax.Array:
    """``batch_size`` distinct slots, uniformly among the valid ones (Gumbel top-k keyed by
    ``(seed, step)``). When fewer slots are valid, invalid ones fill the rest (see ``take_rows``)."""
    key = jax.random.fold_in(jax.random.PRNGKey(seed), step)
    scores = jnp.where(valid, jax.random.gumbel(key, valid.shape), -jnp.inf)
    return jax.lax.top_k(scores, batch_size)[1]


def take_rows(buffer: Buffer, site: str, idx: jax.Array) -> jax.Array:
    """Rows ``idx`` of ``site``; a row from an invalid slot is NaN, so the train step skips (and
    counts) a batch that could not be filled with real tokens instead of training on it."""
    rows = jnp.take(buffer["rows"][site], idx, axis=0)
    return jnp.where(buffer["valid"][idx][:, None], rows, jnp.nan)


def check_fits(widths: dict[str, int], capacity: int, device: jax.Device | None = None) -> None:
    """Refuses a buffer larger than half the device's free memory, saying what it needs and
    how many rows fit (host RAM is the budget of a CPU device)."""
    need = buffer_bytes(widths, capacity)
    available = _device_memory(device or jax.devices()[0])
    if available is not None and need > available // 2:
        per_row = max(1, buffer_bytes(widths, 1))
        raise ValueError(
            f"streaming buffer of {capacity} rows x sites {dict(widths)} needs "
            f"{need / 2**30:.2f} GiB; about {available / 2**30:.2f} GiB of device memory is free "
            f"and the buffer may use half of it: at most {available // 2 // per_row} rows fit "
            "(lower stream.buffer_refills or stream.contexts_per_refill)"
        )


def _device_memory(device: jax.Device) -> int | None:
    """Free bytes of ``device`` (its memory stats, or available host memory for a CPU)."""
    stats = None
    try:
        stats = device.memory_stats()
    except Exception:  # noqa: BLE001 - backends without memory stats
        stats = None
    if stats and "bytes_limit" in stats:
        return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))
    try:
        return int(np.int64(_host_available()))
    except (OSError, ValueError):
        return None


def _host_available() -> int:
    with open("/proc/meminfo", encoding="ascii") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise ValueError("no MemAvailable in /proc/meminfo")
