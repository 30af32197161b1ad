"""The training loss and gradients of one batch: the entry point the step calls, choosing the path.

:func:`gemma_scope_pz.train.objectives.loss_fn` computes every architecture densely (and TopK
sparsely with ``sae.sparse_topk``); :mod:`gemma_scope_pz.train.sparse_jumprelu` computes JumpReLU
from a capped active set when ``config.jumprelu_sparse_cap`` is set (with ``sae.sparse_jumprelu``
"auto", on the CPU only: see :func:`uses_sparse_jumprelu`). Both give the same loss and
gradients; this module picks one so that neither module needs the other's dispatch.
"""

from __future__ import annotations

import jax

from gemma_scope_pz.train import objectives, sparse_jumprelu
from gemma_scope_pz.train.config import TrainConfig


def value_and_grad(
    params: objectives.Params,
    x_in: jax.Array,
    x_out: jax.Array,
    dead: jax.Array,
    sparsity_scale: jax.Array,
    config: TrainConfig,
) -> objectives.ValueAndGrad:
    """``((loss, (metrics, fired, batch_threshold)), grads)`` of one batch: the loss of
    :func:`objectives.loss_fn` (same arguments) and its gradient with respect to ``params``."""
    if uses_sparse_jumprelu(config):
        return sparse_jumprelu.value_and_grad(params, x_in, x_out, dead, sparsity_scale, config)
    grad_fn = jax.value_and_grad(objectives.loss_fn, has_aux=True)
    return grad_fn(params, x_in, x_out, dead, sparsity_scale, config)


def uses_sparse_jumprelu(config: TrainConfig) -> bool:
    """Whether the step takes the sparse JumpReLU path on the default backend.

    ``sae.sparse_jumprelu="on"`` always does; "auto" (a cap from ``config.jumprelu_sparse_cap``)
    only on the CPU. On a GPU the gathers cost more than the dense decode they save: on an H200,
    640 -> 16,384 and 2304 -> 65,536 at batch 4096, the sparse step took 5.5x and 3.9x the dense
    one (``benchmarks/accelerator_results.json``).
    """
    if not config.jumprelu_sparse_cap or config.sae.sparse_topk:
        return False
    return config.sae.sparse_jumprelu == "on" or jax.default_backend() == "cpu"
