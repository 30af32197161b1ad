"""Shared fixtures and factories.

* ``real_model`` / ``real_tokenizer``: the offline Gemma 3 270M, loaded once per session (slow tests);
* ``tiny_model``: a 4-block random Gemma 3 (``Gemma3Config.tiny``), once per session;
  ``make_tiny_model(**config_overrides, seed=...)`` builds others;
* ``make_sae(d_in, d_sae, ...)``: a random JumpReLU/ReLU/TopK ``AutoEncoder`` (with ``w_skip`` for a
  transcoder), numbers scaled so that a fraction of latents fire;
* ``char_tokenizer``: one token per character, ids within the tiny vocabulary (64).
"""

from __future__ import annotations

import math
import os

import numpy as np
import pytest

os.environ.setdefault("JAX_PLATFORMS", "cpu")


def _persistent_compilation_cache() -> None:
    """Many tests compile the same programs (the same tiny model, the same step); a per-worker
    on-disk XLA cache turns the repeats into loads. One folder per pytest-xdist worker, fresh for
    each run, so no test ever sees an executable it did not produce in this run."""
    import atexit
    import shutil
    import tempfile

    import jax

    worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
    folder = tempfile.mkdtemp(prefix=f"gspz_xla_cache_{worker}_")
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    jax.config.update("jax_compilation_cache_dir", folder)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)


if os.environ.get("GEMMA_SCOPE_PZ_TEST_XLA_CACHE", "1") == "1":
    _persistent_compilation_cache()

TINY_LAYERS = 4


class CharTokenizer:
    """One token per character: ids 3..63 (fits the tiny config's vocabulary of 64)."""

    bos_id, eos_id, pad_id = 2, 1, 0

    def encode(self, text: str, add_bos: bool = True, add_eos: bool = False) -> list[int]:
        ids = [3 + (ord(c) - ord("a")) % 61 for c in text]
        return [self.bos_id] * add_bos + ids + [self.eos_id] * add_eos

    def token_strings(self, ids) -> list[str]:
        return ["<bos>" if i == self.bos_id else chr(ord("a") + (int(i) - 3) % 61) for i in ids]

    def decode(self, ids) -> str:
        return "".join(s for i, s in zip(ids, self.token_strings(ids)) if i > self.bos_id)


@pytest.fixture(scope="session")
def real_model():
    import gemma_scope_pz as gs

    return gs.load_model()


@pytest.fixture(scope="session")
def real_tokenizer():
    import gemma_scope_pz as gs

    return gs.load_tokenizer()


@pytest.fixture(scope="session")
def make_tiny_model():
    """``make_tiny_model(seed=0, **Gemma3Config.tiny overrides)`` → a random ``Gemma3LM``."""
    from gemma_scope_pz.models.config import Gemma3Config
    from gemma_scope_pz.models.gemma3 import Gemma3LM

    def make(seed: int = 0, **overrides):
        overrides.setdefault("n_layers", TINY_LAYERS)
        return Gemma3LM.random(Gemma3Config.tiny(**overrides), seed=seed)

    return make


@pytest.fixture(scope="session")
def tiny_model(make_tiny_model):
    """A 4-block random Gemma 3 (d_model 32, vocabulary 64)."""
    return make_tiny_model(seed=1)


@pytest.fixture(scope="session")
def make_sae():
    """``make_sae(d_in, d_sae, *, d_out=None, activation="jumprelu", k=None, skip=False, seed=0,
    site_in="", site_out="")`` → a random ``AutoEncoder`` (``AutoEncoderSkip`` with ``skip``)."""
    from gemma_scope_pz.scope.layers import AutoEncoder, SaeMeta

    def make(
        d_in: int,
        d_sae: int,
        *,
        d_out: int | None = None,
        activation: str = "jumprelu",
        k: int | None = None,
        skip: bool = False,
        seed: int = 0,
        site_in: str = "",
        site_out: str = "",
    ):
        rng = np.random.default_rng(seed)
        d_out = d_in if d_out is None else d_out
        return AutoEncoder.from_arrays(
            w_enc=rng.standard_normal((d_in, d_sae)) / math.sqrt(d_in),
            b_enc=0.1 * rng.standard_normal(d_sae),
            w_dec=rng.standard_normal((d_sae, d_out)) / math.sqrt(d_sae),
            b_dec=0.1 * rng.standard_normal(d_out),
            threshold=np.abs(0.2 * rng.standard_normal(d_sae))
            if activation == "jumprelu"
            else None,
            activation=activation,
            k=k,
            w_skip=0.1 * rng.standard_normal((d_in, d_out)) if skip else None,
            meta=SaeMeta(d_in, d_sae, d_out, site_in=site_in, site_out=site_out or site_in),
        )

    return make


@pytest.fixture(scope="session")
def char_tokenizer() -> CharTokenizer:
    return CharTokenizer()
