"""A CPU-sized training run on real Gemma 3 270M activations at blocks.9.resid_post (slow)."""

import numpy as np
import pytest

import gemma_scope_pz as gs
from gemma_scope_pz.train.config import (
    DictionaryConfig,
    LossConfig,
    OptimConfig,
    RunConfig,
    TrainConfig,
)
from gemma_scope_pz.train.harvest import harvest_array
from gemma_scope_pz.train.trainer import train

pytestmark = pytest.mark.slow
SITE = "blocks.9.resid_post"


@pytest.fixture(scope="module")
def activations(real_model, real_tokenizer):
    rows, info = harvest_array(
        real_model, real_tokenizer, None, [SITE], n_tokens=8192, progress=False
    )
    assert info.sites == (SITE,) and rows[SITE].shape == (8192, 640)
    return rows[SITE]


def _mean(metrics, key, steps):
    return float(np.mean([m[key] for m in metrics if m["step"] in steps]))


def test_jumprelu_fvu_and_l0_fall_over_training(activations, real_model, real_tokenizer, tmp_path):
    config = TrainConfig(
        sae=DictionaryConfig(
            d_in=640, d_sae=512, architecture="jumprelu", site_in=SITE, site_out=SITE
        ),
        loss=LossConfig(sparsity_warmup_steps=500, l0_coeff=2.0),
        optim=OptimConfig(warmup_steps=50, lr=1e-3),
        run=RunConfig(
            batch_size=256,
            total_steps=2500,
            log_every=50,
            progress_bar=False,
            model_name="270m",
            log_path=str(tmp_path / "metrics.jsonl"),
        ),
    )
    result = train(config, activations[:7168])
    steps = [m["step"] for m in result.metrics]
    early, late = set(steps[:4]), set(steps[-4:])
    fvu_early, fvu_late = _mean(result.metrics, "fvu", early), _mean(result.metrics, "fvu", late)
    l0_early, l0_late = _mean(result.metrics, "l0", early), _mean(result.metrics, "l0", late)
    print(f"fvu {fvu_early:.3f} -> {fvu_late:.3f}; l0 {l0_early:.1f} -> {l0_late:.1f}")
    # With the centred initial b_enc (sae.b_enc_init) FVU starts low (0.18 at L0 ~100 here), so
    # the run's gain shows as L0 falling ~24-fold while FVU still falls (0.157 at the end).
    assert fvu_late < fvu_early and fvu_late < 0.5
    assert l0_late < 0.5 * l0_early
    # The trained dictionary, on held-out rows and spliced into the model.
    sae = result.to_autoencoder()
    held_out = activations[7168:]
    x_hat = np.asarray(sae(held_out))
    fvu = np.sum((held_out - x_hat) ** 2) / np.sum((held_out - held_out.mean(0)) ** 2)
    assert fvu < 0.5, fvu
    # A paragraph, not one sentence: FVU over 13 tokens came out at 0.605 on an AVX2 CPU.
    text = (
        "The law of conservation of energy states that energy cannot be created or destroyed. "
        "It can only be changed from one form to another, as when a falling stone turns height "
        "into speed. Engineers use this rule to check every machine they design, and physicists "
        "trust it more than almost any other law."
    )
    tokens = np.array([real_tokenizer.encode(text)])
    ev = gs.evaluate_sae(real_model, sae, tokens, site=SITE, progress=False)
    assert ev.fvu < 0.6 and np.isfinite(ev.delta_loss) and 0 < ev.l0 < 512, ev
