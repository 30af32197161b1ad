"""bfloat16 harvest: the forward in bfloat16 (weights and activations) against the float32 forward."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from penzai import pz

from gemma_scope_pz.train import buffer as buffer_lib
from gemma_scope_pz.train.harvest import harvest_array, model_in_dtype
from tests.conftest import CharTokenizer

TOK = CharTokenizer()
SITES = ["blocks.1.resid_post", "blocks.3.mlp_out"]
DOCS = ["".join(chr(ord("a") + (7 * i + k) % 26) for i in range(40)) for k in range(6)]
# bfloat16 keeps 8 mantissa bits (relative rounding 2**-9 per operation); through 4 blocks the
# relative error of the activations stays a few times that. Stated tolerance: 3e-2 per site.
TOLERANCE = 3e-2


def _relative_error(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def test_model_in_dtype_casts_every_float_array(tiny_model):
    bf16 = model_in_dtype(tiny_model, "bfloat16")
    leaves = [x for x in jax.tree_util.tree_leaves(bf16) if hasattr(x, "dtype")]
    floats = [x for x in leaves if jnp.issubdtype(x.dtype, jnp.floating)]
    assert floats and all(x.dtype == jnp.bfloat16 for x in floats)
    assert model_in_dtype(tiny_model, "float32") is tiny_model
    with pytest.raises(ValueError, match="model_dtype must be one of"):
        model_in_dtype(tiny_model, "float16")


def test_bf16_harvest_rows_close_to_float32(tiny_model):
    options = dict(n_tokens=None, context_len=16, batch_size=4, progress=False)
    f32, _ = harvest_array(tiny_model, TOK, DOCS, SITES, **options)
    bf16, info = harvest_array(tiny_model, TOK, DOCS, SITES, model_dtype="bfloat16", **options)
    assert info.model_dtype == "bfloat16"
    for site in SITES:
        assert bf16[site].dtype == np.float32 and bf16[site].shape == f32[site].shape
        error = _relative_error(bf16[site], f32[site])
        # really computed in bfloat16 (not a no-op), and close to float32
        assert 1e-5 < error < TOLERANCE, (site, error)


def test_bf16_stream_refill_close_to_float32(tiny_model):
    from gemma_scope_pz.train.stream_data import StreamConfig, make_data_step

    tokens = np.stack([[2] + TOK.encode(d, add_bos=False)[:15] for d in DOCS]).astype(np.int32)
    frozen = pz.freeze_params(tiny_model)
    rows = {}
    for dtype in ("float32", "bfloat16"):
        stream = StreamConfig(context_len=16, buffer_refills=1, model_dtype=dtype)
        fill, _ = make_data_step(tuple(SITES), stream, 0, batch_size=8)
        buffer = buffer_lib.init_buffer({s: 32 for s in SITES}, 1, tokens.size)
        model = model_in_dtype(frozen, dtype)  # as train_streaming casts it, once
        buffer, _ = jax.jit(fill)(model, buffer, tokens, jnp.int32(0))
        rows[dtype] = {s: np.asarray(buffer["rows"][s]) for s in SITES}
        assert int(np.asarray(buffer["valid"]).sum()) == tokens.size - len(DOCS)
    for site in SITES:
        assert rows["bfloat16"][site].dtype == np.float32
        assert 1e-5 < _relative_error(rows["bfloat16"][site], rows["float32"][site]) < TOLERANCE
    with pytest.raises(ValueError, match="stream.model_dtype"):
        StreamConfig(model_dtype="int8")
