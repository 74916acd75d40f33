"""The model is walked and rebuilt in chunks (`iter_flat` / `FlatWriter`), never as one float64 copy:
the chunks must be exactly `flatten`'s vector, and writing them back must give every layer its own
shape and dtype, whatever the chunk boundaries (empty layers, a chunk spanning layers, one value)."""

from __future__ import annotations

import numpy as np
import pytest

from clinfed.he.packing import FlatWriter, flatten, iter_flat, layout_of, rechunk


@pytest.mark.parametrize("chunk", [1, 3, 7, 64])
def test_chunks_are_the_flat_vector_and_write_back_into_the_layers(chunk):
    arrays = {
        "b.bias": np.arange(7, dtype=np.float32),
        "a.weight": np.linspace(-1, 1, 12, dtype=np.float32).reshape(3, 4),
        "c.empty": np.zeros((0, 5), dtype=np.float32),
        "d.steps": np.array([3], dtype=np.int64),
    }
    vec, layout = flatten(arrays)
    assert layout_of(arrays) == layout
    pieces = list(iter_flat(arrays, layout, chunk))
    assert all(p.size == chunk for p in pieces[:-1]) and 0 < pieces[-1].size <= chunk
    np.testing.assert_array_equal(np.concatenate(pieces), vec)
    writer = FlatWriter(layout)
    for piece in pieces:
        writer.write(piece)
    back = writer.result()
    for name, arr in arrays.items():
        assert back[name].dtype == arr.dtype and back[name].shape == arr.shape
        np.testing.assert_array_equal(back[name], arr)


def test_a_head_comes_before_the_models_first_value():
    arrays = {"b": np.arange(3, dtype=np.float32), "a": np.array([7.0, 8.0], dtype=np.float32)}
    layout = layout_of(arrays)
    pieces = list(iter_flat(arrays, layout, 4, head=np.ones(1)))
    assert [p.tolist() for p in pieces] == [[1.0, 7.0, 8.0, 0.0], [1.0, 2.0]]


def test_a_writer_refuses_too_many_or_too_few_values():
    layout = layout_of({"w": np.zeros(4, dtype=np.float32)})
    writer = FlatWriter(layout)
    writer.write(np.ones(3))
    with pytest.raises(ValueError, match="layout expects 4"):
        writer.result()
    with pytest.raises(ValueError, match="layout holds 4"):
        writer.write(np.ones(2))
    assert [c.tolist() for c in rechunk([np.array([1, 2]), np.array([3])], 2, np.int64)] == [[1, 2], [3]]
