"""The training loss of one batch: the one entry point the step calls, choosing the computation path.

:func:`gemma_scope_pz.train.objectives.loss_fn` computes every architecture densely (and TopK
sparsely with ``sae.sparse_topk``); :mod:`gemma_scope_pz.train.sparse_jumprelu` computes JumpReLU
from a capped active set when ``config.jumprelu_sparse_cap`` is set. Both give the same loss and
gradients; this module picks one so that neither module needs the other's dispatch.
"""

from __future__ import annotations

import jax

from gemma_scope_pz.train import objectives, sparse_jumprelu
from gemma_scope_pz.train.config import TrainConfig


def loss_fn(
    params: objectives.Params,
    x_in: jax.Array,
    x_out: jax.Array,
    dead: jax.Array,
    sparsity_scale: jax.Array,
    config: TrainConfig,
) -> tuple[jax.Array, tuple[dict[str, jax.Array], jax.Array, jax.Array]]:
    """Total training loss of one batch; arguments and result as :func:`objectives.loss_fn`."""
    if config.jumprelu_sparse_cap and not config.sae.sparse_topk:
        return sparse_jumprelu.loss_fn(params, x_in, x_out, dead, sparsity_scale, config)
    return objectives.loss_fn(params, x_in, x_out, dead, sparsity_scale, config)
