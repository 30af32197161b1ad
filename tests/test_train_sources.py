"""The trainer's data-source protocol: every accepted form gives the same batches by step."""

import numpy as np
import pytest

from gemma_scope_pz.train.sources import (
    ArraySource,
    BatchSource,
    CallableSource,
    IteratorSource,
    as_source,
    batch_indices,
)


def _x(n=30, d=3):
    return np.arange(n * d, dtype=np.float32).reshape(n, d)


def test_array_source_follows_batch_indices():
    x = _x()
    source = as_source(x, batch_size=8, seed=2)
    assert isinstance(source, ArraySource) and isinstance(source, BatchSource)
    for step in (0, 3, 4, 11):  # step 3 crosses the first epoch boundary (24..32 of 30 rows)
        np.testing.assert_array_equal(source.batch_at(step), x[batch_indices(step, 8, 30, 2)])
    x_in, x_out = as_source((x, -x), batch_size=8, seed=2).batch_at(3)
    np.testing.assert_array_equal(x_out, -x_in)
    with pytest.raises(ValueError, match="batch_size"):
        as_source(x)
    with pytest.raises(ValueError, match=r"shape \(30,\)"):
        ArraySource(x[:, 0], batch_size=4)
    with pytest.raises(ValueError, match="30 rows but x_out 29"):
        ArraySource(x, x[:29], batch_size=4)


def test_callable_iterator_and_protocol_objects():
    x = _x()

    def batch_at(step):
        return x[step : step + 2]

    assert isinstance(as_source(batch_at), CallableSource)
    np.testing.assert_array_equal(as_source(batch_at).batch_at(5), x[5:7])

    class Mine:
        def batch_at(self, step):
            return x[:1]

    mine = Mine()
    assert as_source(mine) is mine
    with pytest.raises(TypeError, match="int is not a batch source"):
        as_source(3)


def test_iterator_source_serves_replay_batches_twice_then_moves_on():
    source = as_source((np.full((2, 2), i) for i in range(6)), replay=2)
    assert isinstance(source, IteratorSource)
    first = [source.batch_at(i)[0, 0] for i in range(2)]  # e.g. normaliser estimation
    again = [source.batch_at(i)[0, 0] for i in range(4)]  # training from step 0
    assert first == [0, 1] and again == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="cannot go back to step 1"):
        source.batch_at(1)
    with pytest.raises(ValueError, match="ended before step 9"):
        source.batch_at(9)
