"""Linear layers through our GEMM (kernels/linear.cpp) against float64, over shapes that cross its blocking
(reductions longer than one 256-deep block, several 128-column blocks, partial panels, row counts not multiples
of its 6-row tiles), F16 and F32 weights, with and without bias, 1 and 2 threads, SIMD and scalar builds; ggml's
path (upstream's) through the same harness as a control; and one UNet evaluation against the PyTorch original."""

from __future__ import annotations

import numpy as np
import pytest

from pysdcpp.layers import linear

SHAPES = [  # rows, K, N
    (16, 40, 4),
    (77, 768, 320),
    (100, 300, 17),
    (257, 320, 1280),
    (31, 1000, 150),
    (1100, 520, 130),   # five passes of 256 rows in groups that share one packing, the last group empty
]
# Normalised max error |y - ref|max / |ref|max against the float64 product with the weights the layer holds.
# Ours keeps the activations in F32; ggml's path rounds them to F16 (relative step 2^-11 = 4.9e-4).
BOUNDS = {"fast": 1e-5, "fast_scalar": 1e-5, "upstream": 2e-3}


def _problem(shape, seed):
    rows, k, n = shape
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, k)).astype(np.float32)
    w = (rng.standard_normal((n, k)) / np.sqrt(k)).astype(np.float32)
    b = rng.standard_normal(n).astype(np.float32)
    return x, w, b


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("path", ["fast", "fast_scalar", "upstream"])
@pytest.mark.parametrize("weight_f16", [True, False], ids=["f16w", "f32w"])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "nobias"])
def test_linear_against_float64(shape, path, weight_f16, threads, with_bias):
    x, w, b = _problem(shape, seed=sum(shape))
    b = b if with_bias else None
    held = w.astype(np.float16).astype(np.float32) if weight_f16 else w
    y, _ = linear(x, w, b, path=path, weight_f16=weight_f16, threads=threads)
    ref = x.astype(np.float64) @ held.astype(np.float64).T
    if b is not None:
        ref += b
    assert y.shape == ref.shape
    err = np.abs(y - ref).max() / np.abs(ref).max()
    assert err <= BOUNDS[path], f"normalised max error {err:.2e} > {BOUNDS[path]:.0e}"


def test_batched_rows_and_builds_agree():
    """x with leading batch dimensions gives the same rows as x flattened; the SIMD and scalar builds sum in the
    same order."""
    x, w, b = _problem((2 * 3 * 50, 300, 140), seed=7)
    y, _ = linear(x.reshape(2, 3, 50, 300), w, b, threads=2)
    flat, _ = linear(x, w, b, threads=2)
    scalar, _ = linear(x, w, b, path="fast_scalar", threads=1)
    assert y.shape == (2, 3, 50, 140)
    assert np.array_equal(y.reshape(-1, 140), flat)
    assert np.abs(flat - scalar).max() <= 1e-6 * np.abs(flat).max()


def test_bad_arguments():
    with pytest.raises(ValueError, match="path"):
        linear(np.zeros((4, 8)), np.zeros((3, 8)), path="blas")
    with pytest.raises(ValueError, match="need x"):
        linear(np.zeros((4, 8)), np.zeros((3, 9)))
    with pytest.raises(ValueError, match="bias"):
        linear(np.zeros((4, 8)), np.zeros((3, 8)), np.zeros(4))


@pytest.mark.slow
@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_unet_fast_linear_against_pytorch(family):
    """One UNet evaluation (f16 file, 256 px latent, batch 2) with the linear layers on our GEMM and on ggml's,
    both against diffusers' float32 original holding the same F16-rounded weights: with F16 weights ggml rounds
    the activations to F16 before each linear layer, ours keeps them in F32, so ours must be at least as close to
    the original (both keep the F16 activation roundings of upstream's im2col convs)."""
    from conftest import rel_l2, unet_against_diffusers

    out, ref = unet_against_diffusers(family, 11, {mode: dict(conv="im2col", attention="upstream", linear=mode)
                                                   for mode in ("upstream", "fast")})
    err = {mode: rel_l2(o, ref) for mode, o in out.items()}
    assert err["fast"] <= 2e-3 and err["upstream"] <= 2e-3, err
    assert err["fast"] <= 1.05 * err["upstream"], err
    assert not np.array_equal(out["fast"], out["upstream"])  # the hook really changed the path


def test_the_gemm_tiles_give_equal_results():
    """The narrow (6 x 16, 8-lane) and wide (12 x 32, 16-lane) register tiles sum every output in the same order:
    equal results on every machine (the wide one runs as two AVX registers per vector where AVX-512 is missing),
    each within its bound against float64; the automatic choice is one of them and comes back after the block."""
    from pysdcpp.layers import gemm_tile, gemm_tile_in_use

    auto = gemm_tile_in_use()
    assert auto in ("narrow", "wide")
    x, w, b = _problem((1100, 520, 130), seed=3)   # partial panels, row counts that no tile divides
    out = {}
    for tile in ("narrow", "wide"):
        with gemm_tile(tile):
            assert gemm_tile_in_use() == tile
            out[tile], _ = linear(x, w, b, threads=2)
    assert gemm_tile_in_use() == auto
    assert np.array_equal(out["narrow"], out["wide"])
    ref = x.astype(np.float64) @ w.astype(np.float16).astype(np.float64).T + b
    assert np.abs(out["wide"] - ref).max() / np.abs(ref).max() <= BOUNDS["fast"]
    with pytest.raises(ValueError, match="tile must be"):
        gemm_tile("huge")
