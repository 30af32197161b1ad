"""A model's identity by its weights: ``weights_fingerprint(model)``, a short hash of the parameters.

Caches keyed by this hash (activation caches, trained dictionaries) are never reused for another
model with the same architecture: a fine-tune, an instruction-tuned model or an edited copy.

The hash covers every parameter (sorted by label): its label, shape and dtype, the exact bytes of
up to ``SAMPLES`` evenly strided elements, and the exact bytes of its float32 sum computed on the
device. Every fine-tune changes the sampled elements; a change to a handful of weights changes the
sums. Hashing a Gemma 3 270M takes well under a second and copies only the samples to the host.
The sums come from the device, so the same weights on another backend (CPU vs GPU) may hash
differently: a cache is then rebuilt, never wrongly reused.
"""

from __future__ import annotations

import functools
import hashlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from penzai import pz

from gemma_scope_pz.models.stateful import per_model

SAMPLES = 1024


def weights_fingerprint(model: Any) -> str:
    """A 16-hex-digit hash of the ``pz.Parameter`` values in ``model`` (see the module docstring).

    Remembered per model while its parameters keep their values (``stateful.per_model``): a
    harvest asks for it on every call.

    Raises:
      ValueError: if ``model`` holds no ``pz.Parameter`` (the message names its type).
    """
    return per_model(model, "weights_fingerprint", lambda: _fingerprint(model))


def _fingerprint(model: Any) -> str:
    _, params = pz.unbind_params(model)
    if not params:
        raise ValueError(f"weights_fingerprint: {type(model).__name__} holds no pz.Parameter")
    digest = hashlib.sha256()
    for param in sorted(params, key=lambda p: p.label):
        array = param.value
        if isinstance(array, pz.nx.NamedArrayBase):
            array = array.unwrap(*array.named_axes) if array.named_axes else array.data_array
        array = jnp.asarray(array)
        digest.update(f"{param.label}|{array.shape}|{array.dtype}|".encode())
        sample, total = _sample_and_sum(array)
        digest.update(np.asarray(sample).tobytes())
        digest.update(np.asarray(total).tobytes())
    return digest.hexdigest()[:16]


def _sample_and_sum(array: jax.Array) -> tuple[np.ndarray, np.ndarray]:
    """Up to ``SAMPLES`` evenly strided elements of ``array`` (flattened) and its float32 sum, on
    the host."""
    return jax.device_get(_sample_and_sum_jit(array, max(1, array.size // SAMPLES)))


@functools.partial(jax.jit, static_argnums=1)
def _sample_and_sum_jit(array: jax.Array, stride: int) -> tuple[jax.Array, jax.Array]:
    # jitted so that slicing and summing read the parameter in place (no flattened copy)
    flat = array.reshape(-1)
    return flat[::stride][:SAMPLES], jnp.sum(flat, dtype=jnp.float32)
