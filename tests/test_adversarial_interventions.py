"""Bad input to sites and interventions: strict site names, finite steering and clamp values."""

from __future__ import annotations

import numpy as np
import pytest

import gemma_scope_pz as gs
from gemma_scope_pz.scope.sites import Site


@pytest.mark.parametrize(
    "name",
    [
        "blocks.9.resid_post\n",  # a trailing newline (``$`` alone would accept it)
        "blocks.\u0669.resid_post",  # an Arabic-Indic digit nine
        "blocks.09.resid_post",  # a leading zero
        " blocks.9.resid_post",
        "blocks.9.resid_post.x",
        "blocks.-1.resid_post",
        "blocks.9.RESID_POST",
    ],
)
def test_site_names_are_parsed_strictly(name):
    with pytest.raises(ValueError, match="Unknown site"):
        Site.parse(name)


def test_site_parse_accepts_canonical_names():
    assert Site.parse("blocks.0.resid_pre") == Site(0, "resid_pre")
    assert Site.parse("blocks.17.mlp_out") == Site(17, "mlp_out")
    assert Site.parse(Site(3, "attn_out")).name == "blocks.3.attn_out"


@pytest.mark.parametrize("coeff", [float("nan"), float("inf"), -float("inf")])
def test_steering_coeff_must_be_finite(tiny_model, coeff):
    direction = np.ones(tiny_model.config.d_model, np.float32)
    with pytest.raises(ValueError, match="coeff must be finite"):
        gs.steer(tiny_model, "blocks.1.resid_post", direction, coeff=coeff)


def test_steering_direction_must_be_finite(tiny_model):
    direction = np.ones(tiny_model.config.d_model, np.float32)
    direction[3] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        gs.steer(tiny_model, "blocks.1.resid_post", direction, coeff=1.0)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_clamp_values_must_be_finite(tiny_model, make_sae, value):
    d = tiny_model.config.d_model
    sae = make_sae(d, 16, site_in="blocks.1.resid_post")
    with pytest.raises(ValueError, match="clamp: values must be finite"):
        gs.splice(tiny_model, sae, clamp={2: value})
    gs.splice(tiny_model, sae, clamp={2: 0.0})  # a finite value is accepted
