"""Sharded training (8 fake CPU devices, mesh 2x4 and 8x1) matches single-device training."""

import textwrap

from tests.simulated_devices import run_result

SCRIPT = textwrap.dedent(
    """
    import json, os
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    os.environ["JAX_PLATFORMS"] = "cpu"
    import jax
    import numpy as np
    from gemma_scope_pz.train.config import TrainConfig
    from gemma_scope_pz.train.sharding import make_mesh
    from gemma_scope_pz.train.trainer import train

    assert len(jax.devices()) == 8
    rng = np.random.default_rng(0)
    x = rng.normal(size=(1024, 16)).astype(np.float32)
    out = {}
    for arch in ("topk", "jumprelu"):
        cfg = TrainConfig.from_dict(dict(
            sae=dict(d_in=16, d_sae=64, architecture=arch, k=4, norm_estimation_batches=2),
            loss=dict(l0_coeff=0.1, dead_window_tokens=64),
            optim=dict(warmup_steps=1, lr=1e-2),
            run=dict(batch_size=64, total_steps=6, progress_bar=False),
        ))
        single = train(cfg, x)
        for shape in ((2, 4), (8, 1)):
            sharded = train(cfg, x, mesh=make_mesh(*shape))
            diff = max(float(np.max(np.abs(single.params[k] - sharded.params[k])))
                       for k in single.params)
            out[f"{arch}-{shape[0]}x{shape[1]}"] = diff
    print("RESULT" + json.dumps(out))
    """
)


def test_sharded_training_matches_single_device():
    diffs = run_result(["-c", SCRIPT])
    assert len(diffs) == 4
    for name, diff in diffs.items():
        assert diff < 1e-4, (name, diff)
