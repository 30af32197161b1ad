"""The Penzai tutorial idiom through every runner: models holding ``pz.StateVariable``s.

A model edited the tutorial's way (``pz.select(...).insert_after(SaveIntermediate())``) or holding
any stateful layer must run through ``forward``, ``capture``, ``top_features``, ``evaluate_sae`` and
``generate`` with the same results as the unedited model, and its state variable must hold what a
direct ``model(...)`` call leaves in it.
"""

import dataclasses
import math

import jax.numpy as jnp
import numpy as np
import pytest
from penzai import pz
from penzai.models.transformer.model_parts import TransformerBlock
from penzai.toolshed.save_intermediates import SaveIntermediate

from gemma_scope_pz.models.config import Gemma3Config
from gemma_scope_pz.models.gemma3 import Gemma3LM, forward
from gemma_scope_pz.models.sampling import generate
from gemma_scope_pz.models.stateful import detach_state, state_variables
from gemma_scope_pz.scope.evaluate import evaluate_sae, token_losses, top_features
from gemma_scope_pz.scope.interventions import capture
from gemma_scope_pz.scope.layers import AutoEncoder, SaeMeta

CONFIG = Gemma3Config.tiny(n_layers=4, sliding_window_pattern=2)
LAYER = 2  # the probe goes after this block


@pz.pytree_dataclass
class CountCalls(pz.nn.Layer):
    """Identity layer counting its calls in a state variable (any stateful layer, not a probe).

    Attributes:
      count: Number of calls so far.
    """

    count: pz.StateVariable

    def __call__(self, x, **_unused_side_inputs):
        self.count.value = self.count.value + 1
        return x


def _tokens(batch=2, seq=9, seed=0):
    toks = np.random.default_rng(seed).integers(3, CONFIG.vocab_size, size=(batch, seq))
    toks[:, 0] = 2
    return toks.astype(np.int32)


@pytest.fixture(scope="module")
def model():
    return Gemma3LM.random(CONFIG, seed=1)


def _probed(model, layer=LAYER):
    """The tutorial's edit: a SaveIntermediate after block ``layer``; returns (model, its layer)."""
    probe = SaveIntermediate()
    edited = (
        pz.select(model)
        .at_instances_of(TransformerBlock)
        .pick_nth_selected(layer)
        .insert_after(probe)
    )
    return edited, probe


def _direct(model, tokens):
    """Value a SaveIntermediate after block LAYER holds after a direct, unjitted call."""
    edited, probe = _probed(model)
    positions = np.broadcast_to(np.arange(tokens.shape[1]), tokens.shape)
    edited(
        pz.nx.wrap(jnp.asarray(tokens)).tag("batch", "seq"),
        token_positions=pz.nx.wrap(jnp.asarray(positions)).tag("batch", "seq"),
    )
    return np.asarray(probe.saved.value.unwrap("batch", "seq", "embedding"))


def _resid_post(model, tokens):
    """The same value from the unedited model: block LAYER's resid_post (checked against a direct
    call in test_forward, against the numpy oracle in test_gemma3_model)."""
    return np.asarray(
        capture(model, tokens, f"blocks.{LAYER}.resid_post")[f"blocks.{LAYER}.resid_post"]
    )


def _saved(probe):
    return np.asarray(probe.saved.value.unwrap("batch", "seq", "embedding"))


def _sae(seed=0):
    rng = np.random.default_rng(seed)
    d, n = CONFIG.d_model, 24
    return AutoEncoder.from_arrays(
        w_enc=rng.standard_normal((d, n)) / math.sqrt(d),
        b_enc=0.1 * rng.standard_normal(n),
        w_dec=rng.standard_normal((n, d)) / math.sqrt(n),
        b_dec=0.1 * rng.standard_normal(d),
        threshold=np.abs(0.2 * rng.standard_normal(n)),
        meta=SaeMeta(d, n, d, site_in=f"blocks.{LAYER}.resid_post"),
    )


def test_forward(model):
    tokens = _tokens()
    edited, probe = _probed(model)
    np.testing.assert_allclose(
        forward(edited, tokens), forward(model, tokens), rtol=1e-5, atol=1e-5
    )
    direct = _direct(model, tokens)
    np.testing.assert_allclose(_saved(probe), direct, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(_resid_post(model, tokens), direct, rtol=1e-5, atol=1e-5)
    # a second call of another shape updates the value again
    other = _tokens(batch=1, seq=5, seed=1)
    forward(edited, other)
    np.testing.assert_allclose(_saved(probe), _resid_post(model, other), rtol=1e-5, atol=1e-5)


def test_any_stateful_layer_counts_one_call_per_forward(model):
    counter = CountCalls(pz.StateVariable(value=jnp.zeros((), jnp.int32), label="calls"))
    edited = (
        pz.select(model)
        .at_instances_of(TransformerBlock)
        .pick_nth_selected(1)
        .insert_after(counter)
    )
    forward(edited, _tokens())
    forward(edited, _tokens())
    assert int(counter.count.value) == 2
    capture(edited, _tokens(), "blocks.3.resid_post")
    assert int(counter.count.value) == 3
    generate(edited, [[2, 5, 6], [2, 7]], max_new_tokens=3)
    assert int(counter.count.value) == 4  # the prompt pass, as one direct call on the prompt


@pytest.mark.parametrize(
    "site", ["blocks.1.resid_post", f"blocks.{LAYER}.resid_post", "blocks.3.mlp_out"]
)
def test_capture(model, site):
    tokens = _tokens()
    edited, probe = _probed(model)
    got = capture(edited, tokens, site)[site]
    np.testing.assert_allclose(got, capture(model, tokens, site)[site], rtol=1e-5, atol=1e-5)
    # even when the capture could stop before the probe's block, the probe still runs
    np.testing.assert_allclose(_saved(probe), _resid_post(model, tokens), rtol=1e-5, atol=1e-5)


def test_top_features(model):
    tokens = _tokens(batch=1)[0]
    edited, probe = _probed(model)
    got, want = top_features(edited, _sae(), tokens, k=3), top_features(model, _sae(), tokens, k=3)
    np.testing.assert_array_equal(got["ids"], want["ids"])
    np.testing.assert_allclose(got["values"], want["values"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(
        _saved(probe), _resid_post(model, tokens[None]), rtol=1e-5, atol=1e-5
    )


def test_evaluate_sae_and_token_losses(model):
    tokens = _tokens(batch=3, seq=8, seed=2)
    edited, probe = _probed(model)
    got = evaluate_sae(edited, _sae(), tokens, progress=False)
    want = evaluate_sae(model, _sae(), tokens, progress=False)
    for field in dataclasses.fields(want):
        assert getattr(got, field.name) == pytest.approx(getattr(want, field.name), rel=1e-5), field
    # the clean model's value, not the spliced or ablated copy's
    np.testing.assert_allclose(_saved(probe), _resid_post(model, tokens), rtol=1e-5, atol=1e-5)
    got, want = token_losses(edited, _sae(), tokens[:1]), token_losses(model, _sae(), tokens[:1])
    np.testing.assert_allclose(got["spliced"], want["spliced"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got["clean"], want["clean"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(_saved(probe), _resid_post(model, tokens[:1]), rtol=1e-5, atol=1e-5)


def test_generate(model):
    prompts = [[2, 11, 12, 13, 14], [2, 21, 22, 23, 24]]
    edited, probe = _probed(model)
    got = generate(edited, prompts, max_new_tokens=4)
    assert got == generate(model, prompts, max_new_tokens=4)
    # the value of the prompt pass, as a direct call on the prompt
    np.testing.assert_allclose(
        _saved(probe), _resid_post(model, np.asarray(prompts, np.int32)), rtol=1e-5, atol=1e-5
    )


def test_detach_state_copies_variables_and_keeps_sharing():
    shared = pz.StateVariable(value=jnp.zeros(()), label="shared")
    tree = pz.nn.Sequential([CountCalls(shared), CountCalls(shared)])
    copy = detach_state(tree)
    (var,) = state_variables(copy)
    assert var is not shared and var.label != shared.label
    copy(jnp.zeros(()))
    assert float(var.value) == 2.0 and float(shared.value) == 0.0
    plain = pz.nn.Sequential([pz.nn.Identity()])
    assert detach_state(plain) is plain and state_variables(plain) == ()


def test_runner_jit_takes_the_variable_path_only_when_needed(model):
    from gemma_scope_pz.models import stateful

    calls = []

    def double(tree, x):
        calls.append(1)  # counts traces
        return x * 2

    fn = stateful.jit(double)
    frozen = pz.freeze_params(model)
    edited, probe = _probed(model)
    assert not stateful.has_variables(frozen) and stateful.has_variables(edited)
    assert stateful.has_variables(model)  # unfrozen parameters are variables too
    np.testing.assert_array_equal(fn(frozen, jnp.ones(3)), 2.0)
    np.testing.assert_array_equal(fn(pz.freeze_params(edited), jnp.ones(3)), 2.0)
    fn(frozen, jnp.ones(3))
    assert len(calls) == 2  # one trace per path, the plain one reused


def test_a_probe_inside_the_dictionary(model):
    from gemma_scope_pz.scope.layers import JumpReLU

    tokens = _tokens(batch=1)[0]
    probe = SaveIntermediate()
    probed_sae = pz.select(_sae()).at_instances_of(JumpReLU).insert_after(probe)
    got = top_features(model, probed_sae, tokens, k=3)
    want = top_features(model, _sae(), tokens, k=3)
    np.testing.assert_array_equal(got["ids"], want["ids"])
    latents = np.asarray(probe.saved.value.unwrap("batch", "seq", "latents"))[0]
    np.testing.assert_allclose(latents[1:], want["latents"][1:], rtol=1e-5, atol=1e-5)
