"""Influence of column nodes on the logits through a partly computed edge matrix.

While feature rows are still being computed (greedily, most influential first), the ranking
needs the influence of every active feature through the rows so far. The rows can be far wider
than they are tall (all active features of a long prompt), so this never forms a normalized or
float64 copy of them: the walk runs on the small square of row-node columns and the rows are
read in chunks of `ROW_CHUNK`.
"""

from __future__ import annotations

import numpy as np

from gemma_scope_pz.circuits.graph import compute_influence

__all__ = ["ROW_CHUNK", "partial_influence"]

ROW_CHUNK = 32  # rows per step of the host-side influence products


def partial_influence(
    rows: np.ndarray, row_nodes: np.ndarray, logit_p: np.ndarray, n_out: int
) -> np.ndarray:
    """Influence of the first ``n_out`` column nodes on the logits, through the rows so far.

    ``row_nodes[r]`` is row ``r``'s node (a column index; logit nodes lie past the columns).
    Influence flows only through row nodes, so the walk runs on the small square
    ``rows[:, row_nodes]``; one chunked product with every row then gives the influence on
    all columns, without a normalized copy of the whole edge matrix.
    """
    n, width = rows.shape
    sums = np.concatenate(
        [np.abs(rows[i : i + ROW_CHUNK]).sum(axis=1) for i in range(0, n, ROW_CHUNK)]
    )
    denom = np.maximum(sums, 1e-8)[:, None]
    inside = row_nodes < width
    square = np.zeros((n, n), np.float32)
    square[:, inside] = np.abs(rows[:, row_nodes[inside]]) / denom
    start = np.zeros(n)
    start[~inside] = logit_p[row_nodes[~inside] - width]
    total = start + compute_influence(square, start, max_iter=128)  # every row node's influence
    influence = np.zeros(n_out)
    for i in range(0, n, ROW_CHUNK):
        block = np.abs(rows[i : i + ROW_CHUNK, :n_out]) / denom[i : i + ROW_CHUNK]
        influence += total[i : i + ROW_CHUNK] @ block
    return influence
