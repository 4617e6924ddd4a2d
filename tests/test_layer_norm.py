"""The fused layer normalisation (kernels/layernorm.cpp) against float64: the transformers' widths (320-1280) and
widths with a vector tail, rows whose mean dwarfs their spread, with and without beta, 1 and 2 threads, SIMD and
scalar builds; ggml's three ops (upstream's graph) through the same harness as a control."""

from __future__ import annotations

import numpy as np
import pytest

from pysdcpp.layers import layer_norm

CASES = [  # shape (..., C), offset of the rows' mean
    ((2, 4096, 320), 0.0),
    ((77, 768), 3.0),
    ((5, 13), -40.0),
    ((1, 1280), 0.0),
    ((3, 7, 640), 200.0),
]


def _reference(x, gamma, beta, eps):
    xd = x.astype(np.float64)
    norm = (xd - xd.mean(-1, keepdims=True)) / np.sqrt(xd.var(-1, keepdims=True) + eps)
    return norm * gamma + (0.0 if beta is None else beta)


@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c[0])) + f"-m{c[1]:g}")
@pytest.mark.parametrize("path", ["fast", "fast_scalar", "upstream"])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("with_beta", [True, False], ids=["beta", "no-beta"])
def test_layer_norm_against_float64(case, path, threads, with_beta):
    shape, offset = case
    rng = np.random.default_rng(shape[-1] + len(shape))
    x = (rng.standard_normal(shape) * 2 + offset).astype(np.float32)
    gamma = rng.standard_normal(shape[-1]).astype(np.float32)
    beta = rng.standard_normal(shape[-1]).astype(np.float32) if with_beta else None
    y, _ = layer_norm(x, gamma, beta, eps=1e-5, path=path, threads=threads)
    ref = _reference(x, gamma, beta, 1e-5)
    # the F32 input holds |mean| / spread * 2^-24 relative error in each normalised value
    bound = 2e-6 * max(1.0, abs(offset) / 2) * np.abs(gamma).max() + 1e-6
    err = np.abs(y - ref).max()
    assert err <= bound, f"max error {err:.2e} > {bound:.1e}"


@pytest.mark.parametrize("bad", [dict(gamma=np.ones(3)), dict(beta=np.ones(5)), dict(eps=-1.0), dict(path="ggml"),
                                 dict(threads=0), dict(x=np.zeros((2, 0)))])
def test_bad_arguments_raise(bad):
    args = dict(x=np.zeros((2, 4)), gamma=np.ones(4), beta=np.zeros(4))
    args.update(bad)
    with pytest.raises(ValueError):
        layer_norm(**args)
