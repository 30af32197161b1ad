"""Shared fixtures: the real offline Gemma 3 270M is loaded once per test session."""

import os

import pytest

os.environ.setdefault("JAX_PLATFORMS", "cpu")


@pytest.fixture(scope="session")
def real_model():
    import gemma_scope_pz as gs

    return gs.load_model()


@pytest.fixture(scope="session")
def real_tokenizer():
    import gemma_scope_pz as gs

    return gs.load_tokenizer()
