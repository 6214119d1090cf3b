"""The aggregator's fast paths: Flower arrays viewed in place (ops.arrays), the finite check
by a sum, and the in-place division of ``result``."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord

from ark_core.fed.aggregate import StreamingAggregator, UpdateRejected
from ops.arrays import Tensors, to_tensor


def _master() -> dict[str, torch.Tensor]:
    return {"backbone.w": torch.zeros(3, 4), "heads.a.weight": torch.zeros(2, 3)}


@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.float64])
def test_flower_arrays_are_read_in_place_with_their_values(dtype):
    x = np.arange(12, dtype=dtype).reshape(3, 4) / 7
    arr = Array.from_numpy_ndarray(x)
    t = to_tensor(arr)
    assert t.dtype == torch.from_numpy(x).dtype
    assert torch.equal(t, torch.from_numpy(x))
    assert not t.numpy().flags.owndata  # a view of the message's bytes, not a copy
    fortran = Array.from_numpy_ndarray(np.asfortranarray(x))
    assert torch.equal(to_tensor(fortran), torch.from_numpy(x))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_a_single_non_finite_value_in_a_flower_array_is_rejected(bad):
    agg = StreamingAggregator(_master())
    w = np.ones((3, 4), np.float32)
    w[1, 2] = bad
    update = Tensors(ArrayRecord({
        "backbone.w": Array.from_numpy_ndarray(w),
        "heads.a.weight": Array.from_numpy_ndarray(np.ones((2, 3), np.float32))}))
    with pytest.raises(UpdateRejected, match="NaN or Inf"):
        agg.add("s1", update, 10, {"a": 10})
    assert agg.num_accepted == 0


def test_fp16_values_whose_fp16_sum_would_overflow_are_accepted():
    agg = StreamingAggregator({"backbone.w": torch.zeros(300, 300, dtype=torch.float16)})
    agg.add("s1", {"backbone.w": np.full((300, 300), 60.0, np.float16)}, 1, {})
    assert agg.result()["backbone.w"].float().mean().item() == 60.0


def test_result_divides_in_place_and_closes_the_round():
    agg = StreamingAggregator(_master())
    for site, value, n in (("s1", 1.0, 1), ("s2", 4.0, 3)):
        rec = ArrayRecord({k: Array.from_numpy_ndarray(np.full(tuple(v.shape), value, np.float32))
                           for k, v in _master().items()})
        agg.add(site, Tensors(rec), n, {"a": n})
    out = agg.result()
    assert torch.allclose(out["backbone.w"], torch.full((3, 4), 13 / 4))
    assert agg.result() is out  # the same result again, not the master's values
    with pytest.raises(RuntimeError, match="already averaged: call begin_round"):
        agg.add("s3", {k: v.numpy() for k, v in _master().items()}, 1, {"a": 1})
