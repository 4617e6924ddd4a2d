"""1x1 convolutions through our GEMM (kernels/pointwise.cpp) against float64: channel counts across the GEMM's
256-deep blocks, position counts with partial 16-wide panels and several column blocks, batches, F16 and F32
weights, with and without bias, 1 and 2 threads, SIMD and scalar builds; ggml's im2col path through the same
harness as a control. (The models' 1x1 convs run here through the conv hook: the UNet and VAE tests against
PyTorch cover that route.)"""

from __future__ import annotations

import numpy as np
import pytest

from pysdcpp.layers import conv2d_1x1

SHAPES = [  # N, C, H, W, K
    (1, 5, 16, 16, 3),
    (2, 320, 17, 19, 640),
    (1, 600, 9, 31, 130),
    (3, 64, 8, 8, 20),
]
# Normalised max error against the float64 product with the weights the layer holds; ggml's path rounds the
# activations to F16 in its im2col columns.
BOUNDS = {"fast": 1e-5, "fast_scalar": 1e-5, "upstream": 2e-3}


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("path", ["fast", "fast_scalar", "upstream"])
@pytest.mark.parametrize("weight_f16", [True, False], ids=["f16w", "f32w"])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "nobias"])
def test_conv1x1_against_float64(shape, path, weight_f16, threads, with_bias):
    n, c, h, w, k = shape
    rng = np.random.default_rng(sum(shape))
    x = rng.standard_normal((n, c, h, w)).astype(np.float32)
    wt = (rng.standard_normal((k, c)) / np.sqrt(c)).astype(np.float32)
    b = rng.standard_normal(k).astype(np.float32) if with_bias else None
    held = wt.astype(np.float16).astype(np.float64) if weight_f16 else wt.astype(np.float64)
    y, _ = conv2d_1x1(x, wt, b, path=path, weight_f16=weight_f16, threads=threads)
    ref = np.einsum("kc,nchw->nkhw", held, x.astype(np.float64))
    if b is not None:
        ref += b[None, :, None, None]
    assert y.shape == ref.shape
    err = np.abs(y - ref).max() / np.abs(ref).max()
    assert err <= BOUNDS[path], f"normalised max error {err:.2e} > {BOUNDS[path]:.0e}"


def test_builds_agree_and_weight_shapes():
    """The SIMD and scalar builds sum in the same order; (K, C, 1, 1) weights are the (K, C) matrix."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((1, 300, 12, 12)).astype(np.float32)
    wt = rng.standard_normal((40, 300)).astype(np.float32)
    simd, _ = conv2d_1x1(x, wt, threads=2)
    scalar, _ = conv2d_1x1(x, wt, path="fast_scalar")
    four_d, _ = conv2d_1x1(x, wt.reshape(40, 300, 1, 1), threads=2)
    np.testing.assert_allclose(simd, scalar, rtol=0, atol=1e-5 * np.abs(scalar).max())
    assert np.array_equal(simd, four_d)


@pytest.mark.parametrize("bad", [
    dict(x=np.zeros((1, 4, 3, 3)), w=np.zeros((2, 5))),
    dict(x=np.zeros((4, 3, 3)), w=np.zeros((2, 4))),
    dict(x=np.zeros((1, 4, 3, 3)), w=np.zeros((2, 4)), bias=np.zeros(3)),
    dict(x=np.zeros((1, 4, 3, 3)), w=np.zeros((2, 4)), path="im2col"),
    dict(x=np.zeros((1, 4, 3, 3)), w=np.zeros((2, 4)), threads=0),
])
def test_bad_arguments_raise(bad):
    with pytest.raises(ValueError):
        conv2d_1x1(**bad)


def test_the_gemm_tiles_give_equal_results():
    """1x1 convs through the narrow and the wide GEMM tiles: equal outputs (the same summation order)."""
    from pysdcpp.layers import gemm_tile

    rng = np.random.default_rng(5)
    x = rng.standard_normal((2, 320, 17, 19)).astype(np.float32)
    wt = rng.standard_normal((130, 320)).astype(np.float32)
    out = {}
    for tile in ("narrow", "wide"):
        with gemm_tile(tile):
            out[tile], _ = conv2d_1x1(x, wt, threads=2)
    assert np.array_equal(out["narrow"], out["wide"])
