"""The fused GEGLU node (kernels/geglu.cpp) against float64: widths with and without a vector tail, gates far
out in both tails (the sigmoid must neither overflow nor lose the identity), batches of rows, 1 and 2 threads,
SIMD and scalar builds; ggml's ops (upstream's graph: copy, GELU through its F16 table, product) through the same
harness as a control, within the rounding of that table."""

from __future__ import annotations

import numpy as np
import pytest

from pysdcpp.layers import geglu

CASES = [  # (rows, D), scale of the gate
    ((1, 8), 1.0),
    ((3, 13), 4.0),
    ((77, 1280), 1.0),
    ((2, 4096, 1280), 2.0),
    ((5, 640), 30.0),
]


def _reference(p):
    pd = p.astype(np.float64)
    d = p.shape[-1] // 2
    value, gate = pd[..., :d], pd[..., d:]
    return value * 0.5 * gate * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (gate + 0.044715 * gate ** 3)))


@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c[0])) + f"-s{c[1]:g}")
@pytest.mark.parametrize("path", ["fast", "fast_scalar", "upstream"])
@pytest.mark.parametrize("threads", [1, 2])
def test_geglu_against_float64(case, path, threads):
    shape, scale = case
    rng = np.random.default_rng(shape[-1])
    p = rng.standard_normal(shape[:-1] + (2 * shape[-1],)).astype(np.float32)
    p[..., shape[-1]:] *= scale
    y, _ = geglu(p, path=path, threads=threads)
    ref = _reference(p)
    assert y.shape == ref.shape
    value, gate = np.abs(p[..., :shape[-1]]), np.abs(p[..., shape[-1]:])
    if path == "upstream":
        # ggml looks GELU up by the gate rounded to F16 in a table of F16 values: two roundings of relative 2^-11,
        # of the gate (GELU's slope is at most 1.13) and of |gelu(g)| <= |g|
        bound = value * (2.2 * gate * 2.0 ** -11 + 1e-6)
    else:
        bound = value * gate * 1e-6 + 1e-7   # a few roundings of value * gate * sigmoid
    err = np.abs(y - ref)
    assert np.all(err <= bound), f"max error {err.max():.2e}, worst excess {(err - bound).max():.2e}"


def test_geglu_tails():
    """Far tails: gelu(g) -> g above, -> 0 (never NaN or inf) below, also where g^3 overflows."""
    # +-1e13: gate^3 overflows F32 (the sigmoid's argument is infinite)
    gate = np.array([-1e13, -1e4, -200.0, -20.0, -9.0, 0.0, 9.0, 20.0, 200.0, 1e4, 1e13], np.float32)
    p = np.concatenate([np.ones_like(gate), gate])[None]
    for path in ("fast", "fast_scalar"):
        y, _ = geglu(p, path=path)
        assert np.all(np.isfinite(y))
        np.testing.assert_allclose(y[0], _reference(p)[0], rtol=1e-6, atol=1e-20)
    # infinite gates: gelu's limits, 0 below (where -inf * sigmoid alone is NaN; ggml's GELU gives 0 too) and the
    # gate itself above
    p = np.array([[1.0, 1.0, 3.0, -np.inf, np.inf, -5.0]], np.float32)
    for path in ("fast", "fast_scalar"):
        y, _ = geglu(p, path=path)
        assert y[0, 0] == 0.0 and y[0, 1] == np.inf, y
        assert y[0, 2] == pytest.approx(_reference(np.array([[3.0, -5.0]]))[0, 0], rel=1e-6), y


@pytest.mark.parametrize("bad", [np.zeros((2, 3), np.float32), np.zeros((0, 4), np.float32)])
def test_geglu_refuses(bad):
    with pytest.raises(ValueError, match="even last axis"):
        geglu(bad)
    with pytest.raises(ValueError, match="path"):
        geglu(np.zeros((1, 4), np.float32), path="ggml")
