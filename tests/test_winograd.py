"""Winograd F(4x4,3x3) and F(2x2,3x3) graph nodes against a float64 direct convolution over awkward shapes:
batch 2, odd sizes, H or W below a tile, padding 0 and 1, channel counts not multiples of 8, 1 and 2 threads,
F16 and F32 weights; the products through our GEMM (SIMD and portable scalar builds) and through ggml's.
Upstream's im2col runs through the same harness as a control."""

from __future__ import annotations

import functools

import numpy as np
import pytest

from pysdcpp.layers import conv2d_3x3

SHAPES = [  # N, C, H, W, K, pad
    (1, 3, 8, 8, 5, 1),
    (2, 7, 9, 11, 13, 1),
    (1, 16, 3, 3, 8, 1),
    (1, 8, 2, 5, 4, 1),
    (2, 5, 6, 7, 9, 0),
    (1, 33, 17, 13, 24, 0),
    (1, 64, 16, 16, 40, 1),
    (2, 20, 1, 1, 3, 1),
    (1, 12, 3, 4, 6, 0),
    (1, 130, 10, 10, 17, 1),
    # Our GEMM's blocking: more tiles than one work item (96) and not a multiple of its 6-row tiles, a
    # reduction longer than one block (256 channels), several column blocks (128) and a partial last panel.
    (2, 300, 26, 30, 147, 1),
]
# Normalised max error |y - ref|max / |ref|max, per variant, against the float64 convolution of the weights
# the layer holds (F16-rounded when the layer holds F16).
BOUNDS = {"winograd_f4": 2e-5, "winograd_f4_in_graph": 2e-5, "winograd_f4_scalar": 2e-5,
          "winograd_f4_ggml_gemm": 2e-5, "winograd_f4_fused": 2e-5, "winograd_f2": 5e-6, "winograd_f2_fused": 5e-6,
          "im2col": 2e-3}
FAST_PATHS = ["winograd_f4", "winograd_f4_in_graph", "winograd_f4_scalar", "winograd_f4_ggml_gemm",
              "winograd_f4_fused", "winograd_f2", "winograd_f2_fused"]


def reference_conv(x: np.ndarray, w: np.ndarray, b: np.ndarray, pad: int) -> np.ndarray:
    x = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    win = np.lib.stride_tricks.sliding_window_view(x, (3, 3), axis=(2, 3))  # N C OH OW 3 3
    return np.einsum("ncyxij,kcij->nkyx", win, w.astype(np.float64)) + b.astype(np.float64)[None, :, None, None]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("algorithm", FAST_PATHS + ["im2col"])
@pytest.mark.parametrize("weight_f16", [True, False], ids=["f16w", "f32w"])
@pytest.mark.parametrize("threads", [1, 2])
def test_conv_against_float64(shape, algorithm, weight_f16, threads):
    x, w, b, pad = _problem(shape, seed=hash(shape) % 2**32)
    y, _ = conv2d_3x3(x, w, b, pad=pad, algorithm=algorithm, weight_f16=weight_f16, threads=threads)
    ref = _reference_of(shape, weight_f16)
    assert y.shape == ref.shape
    err = np.abs(y - ref).max() / np.abs(ref).max()
    bound = BOUNDS[algorithm]
    if algorithm == "im2col" and not weight_f16:
        bound = 2e-5
    assert err <= bound, f"normalised max error {err:.2e} > {bound:.0e}"


@functools.lru_cache(maxsize=None)
def _reference_of(shape, weight_f16):
    """The float64 result for test_conv_against_float64's problem (computed once per shape and weight type)."""
    x, w, b, pad = _problem(shape, seed=hash(shape) % 2**32)
    held = w.astype(np.float16).astype(np.float32) if weight_f16 else w
    return reference_conv(x, held, b, pad)


def _problem(shape, seed=0):
    n, c, h, wd, k, pad = shape
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, c, h, wd)).astype(np.float32)
    w = (rng.standard_normal((k, c, 3, 3)) / np.sqrt(9 * c)).astype(np.float32)
    b = rng.standard_normal(k).astype(np.float32)
    return x, w, b, pad


def test_in_graph_transform_equals_cached():
    """The filter transform as a graph node and the hoisted (cached) one are the same computation."""
    x, w, b, pad = _problem((2, 33, 17, 13, 24, 1))
    cached, _ = conv2d_3x3(x, w, b, pad=pad, algorithm="winograd_f4", threads=2)
    in_graph, _ = conv2d_3x3(x, w, b, pad=pad, algorithm="winograd_f4_in_graph", threads=2)
    assert np.array_equal(cached, in_graph)


@pytest.mark.parametrize("shape", [(2, 300, 26, 30, 147, 1), (1, 70, 8, 8, 40, 1), (1, 3, 9, 7, 17, 0)],
                         ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("tile", ["f4", "f2"])
def test_fused_transform_equals_cached(shape, tile):
    """The filter transform fused into the products (block by block: 64 input channels, 32 output channels, 96
    tiles per block; partial blocks and panels in these shapes) computes the same U and sums the products in the
    same order as the cached U: bit for bit the same output."""
    x, w, b, pad = _problem(shape, seed=6)
    cached, _ = conv2d_3x3(x, w, b, pad=pad, algorithm=f"winograd_{tile}", threads=2)
    fused, _ = conv2d_3x3(x, w, b, pad=pad, algorithm=f"winograd_{tile}_fused", threads=2)
    assert np.array_equal(cached, fused)


def test_gemm_builds_agree():
    """Our GEMM's SIMD and scalar builds run the same blocking and summation order per output: equal up to
    the FMA contraction the SIMD build may use; ggml's GEMM sums in another order, so only close."""
    x, w, b, pad = _problem((2, 300, 26, 30, 147, 1), seed=4)
    own, _ = conv2d_3x3(x, w, b, pad=pad, algorithm="winograd_f4", threads=2)
    scalar, _ = conv2d_3x3(x, w, b, pad=pad, algorithm="winograd_f4_scalar", threads=1)
    ggml, _ = conv2d_3x3(x, w, b, pad=pad, algorithm="winograd_f4_ggml_gemm", threads=2)
    scale = np.abs(own).max()
    assert np.abs(own - scalar).max() <= 1e-6 * scale
    assert np.abs(own - ggml).max() <= 2e-5 * scale
    assert not np.array_equal(own, ggml)  # the two products really are different code


@pytest.mark.parametrize("algorithm", ["winograd_f4", "winograd_f2", "winograd_f4_fused"])
def test_fused_bias(algorithm):
    """The output transform adds the bias (the layers above all pass one): with and without it, against
    float64, and the difference is exactly the bias broadcast."""
    x, w, b, pad = _problem((2, 20, 10, 9, 12, 1), seed=9)
    held = w.astype(np.float16).astype(np.float32)
    with_bias, _ = conv2d_3x3(x, w, b, pad=pad, algorithm=algorithm, threads=2)
    no_bias, _ = conv2d_3x3(x, w, None, pad=pad, algorithm=algorithm, threads=2)
    ref = reference_conv(x, held, np.zeros_like(b), pad)
    assert np.abs(no_bias - ref).max() / np.abs(ref).max() <= BOUNDS[algorithm]
    np.testing.assert_allclose(with_bias - no_bias, np.broadcast_to(b[None, :, None, None], ref.shape),
                               rtol=0, atol=1e-5 * np.abs(with_bias).max())


@pytest.fixture
def small_chunks():
    """Makes every Winograd node split its tiles into chunks of a given count, then restores the default."""
    from pysdcpp import _native

    lib = _native.load("accelerated").lib

    def set_tiles(c, k, tiles):
        lib.pysdcpp_set_winograd_chunk_bytes((c + k) * 36 * 4 * tiles)

    yield set_tiles
    lib.pysdcpp_set_winograd_chunk_bytes(0)


@pytest.mark.parametrize("shape,tiles", [((2, 7, 9, 11, 13, 1), 4), ((1, 33, 17, 13, 24, 0), 5),
                                         ((2, 9, 14, 10, 7, 1), 5)],
                         ids=lambda s: "x".join(map(str, s)) if isinstance(s, tuple) else f"chunk{s}")
@pytest.mark.parametrize("algorithm", ["winograd_f4", "winograd_f4_in_graph", "winograd_f4_fused"])
def test_chunked_tiles(shape, tiles, algorithm, small_chunks):
    """Tiles in chunks (each chunk's output transform writing into the same output in place; uneven last
    chunks, chunks across two images of the batch), against float64 and against the whole map in one piece."""
    x, w, b, pad = _problem(shape, seed=5)
    whole, _ = conv2d_3x3(x, w, b, pad=pad, algorithm=algorithm, threads=2)
    small_chunks(shape[1], shape[4], tiles)
    chunked, _ = conv2d_3x3(x, w, b, pad=pad, algorithm=algorithm, threads=2, repeat=2)
    ref = reference_conv(x, w.astype(np.float16).astype(np.float32), b, pad)
    assert np.abs(chunked - ref).max() / np.abs(ref).max() <= BOUNDS["winograd_f4"]
    assert np.abs(chunked - whole).max() <= 1e-6 * np.abs(whole).max()


def test_bad_arguments():
    x = np.zeros((1, 4, 8, 8), np.float32)
    with pytest.raises(ValueError, match="algorithm"):
        conv2d_3x3(x, np.zeros((2, 4, 3, 3)), algorithm="fft")
    with pytest.raises(ValueError, match="need x"):
        conv2d_3x3(x, np.zeros((2, 5, 3, 3)))
    with pytest.raises(ValueError, match="too small"):
        conv2d_3x3(np.zeros((1, 4, 1, 1), np.float32), np.zeros((2, 4, 3, 3)), pad=0)


def test_cost_model_plan():
    """The per-layer choice (docs/benchmarks.md, layer tables): F(4x4) with a hoisted filter transform from 64
    tiles on, inside the products below; F(2x2) inside the products on maps of 8x8 outputs or fewer; im2col at
    4x4; ggml's GEMM for hoisted layers with fewer than 16 output channels."""
    from pysdcpp.layers import conv_plan

    assert conv_plan(1, 320, 64, 64, 320) == "winograd_f4"             # 256 tiles
    assert conv_plan(1, 640, 32, 32, 640) == "winograd_f4"             # 64 tiles
    assert conv_plan(1, 4, 32, 32, 320) == "winograd_f4"               # 4 input channels
    assert conv_plan(1, 1280, 16, 16, 1280) == "winograd_f4_fused"    # 16 tiles
    assert conv_plan(4, 1280, 16, 16, 1280) == "winograd_f4"           # batch 4: 64 tiles
    assert conv_plan(1, 1280, 8, 8, 1280) == "winograd_f2_fused"       # 8x8 outputs
    assert conv_plan(1, 1280, 10, 10, 640, pad=0) == "winograd_f2_fused"
    assert conv_plan(1, 1280, 4, 4, 1280) == "im2col"
    assert conv_plan(1, 128, 256, 256, 3) == "winograd_f4_ggml_gemm"  # 3 output channels


@pytest.mark.slow
@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_unet_and_vae_winograd_vs_im2col(family):
    """One UNet evaluation and one VAE decode at 256 px (f16 weights): Winograd against upstream's im2col. The
    32x32 latent has every kind of map: 32x32 (filters hoisted), 16x16 (F(4x4) with the transform inside the
    products), 8x8 (F(2x2), likewise) and 4x4 (im2col); the decoder's maps of 32x32 and up hoist theirs."""
    from conftest import model_gguf, rel_l2

    from pysdcpp import StableDiffusion
    from pysdcpp.layers import conv_routes

    path = model_gguf(family)
    rng = np.random.default_rng(3)
    width = 768 if family == "sd1" else 1024
    latent = rng.standard_normal((1, 4, 32, 32)).astype(np.float32)
    context = rng.standard_normal((1, 77, width)).astype(np.float32)
    out = {}
    routes = {}
    for conv in ("im2col", "winograd"):
        with StableDiffusion(path, threads=2, conv=conv, attention="upstream", linear="upstream") as sd:
            out[conv] = (sd.unet(latent, 500.0, context), sd.decode(latent))
            conv_routes(reset=True)  # a later evaluation of the same scope: the hoisted filters are cached
            sd.unet(latent, 400.0, context)
            routes[conv] = conv_routes(reset=True)
    assert sum(routes["im2col"].values()) == 0  # the hook is off
    r = routes["winograd"]
    assert r["cached"] > 0 and r["fused"] > 0 and r["im2col"] > 0, r  # each of the UNet's kinds of map
    assert rel_l2(out["winograd"][0], out["im2col"][0]) <= 2e-3
    assert rel_l2(out["winograd"][1], out["im2col"][1]) <= 2e-3


@pytest.mark.slow
def test_filter_cache_lives_with_the_component(tmp_path):
    """Transformed filters are cached while the UNet samples (or a caller loops over sd.unet()) and released
    with its compute buffer when sampling ends; a VAE decode
    (one evaluation) transforms its filters inside the graph and caches nothing; the scope's end changes no
    result: two generations in one context give the same image, equal to a fresh context's."""
    from conftest import model_gguf

    from pysdcpp import StableDiffusion, _native

    lib = _native.load("accelerated").lib
    path = model_gguf("sd1")
    kw = dict(width=256, height=256, num_inference_steps=2, sampler="euler", seed=7)
    with StableDiffusion(path, threads=2) as sd:
        # sd.unet() calls share one scope (a caller's own sampling loop): the filters stay between calls...
        latent = np.random.default_rng(0).standard_normal((1, 4, 32, 32)).astype(np.float32)
        context = np.random.default_rng(1).standard_normal((1, 77, 768)).astype(np.float32)
        sd.unet(latent, 500.0, context)
        sd.unet(latent, 400.0, context)
        assert lib.pysdcpp_winograd_cache_bytes() > 0
        # ... until a generation's sampling ends.
        lib.pysdcpp_winograd_cache_peak_bytes(1)
        first = np.asarray(sd.generate("a cat", **kw)[0])
        peak = lib.pysdcpp_winograd_cache_peak_bytes(1)
        assert 0 < peak <= sd.winograd_cache_mb << 20
        assert lib.pysdcpp_winograd_cache_bytes() == 0
        second = np.asarray(sd.generate("a cat", **kw)[0])
        assert lib.pysdcpp_winograd_cache_bytes() == 0
        lib.pysdcpp_winograd_cache_peak_bytes(1)
        sd.decode(latent)
        assert lib.pysdcpp_winograd_cache_peak_bytes(1) == 0
    assert np.array_equal(first, second)
    with StableDiffusion(path, threads=2, winograd_cache_mb=0) as sd:
        lib.pysdcpp_winograd_cache_peak_bytes(1)
        no_cache = np.asarray(sd.generate("a cat", **kw)[0])
        assert lib.pysdcpp_winograd_cache_peak_bytes(1) == 0
    # Without a cache the filters are transformed in the graph or inside the products: the same U and the same
    # order of summation, so the same image bit for bit.
    assert np.array_equal(first, no_cache)


@pytest.mark.slow
def test_chunked_vae_decode_batch2(small_chunks):
    """A batch-2 VAE decode with the smallest chunks (every Winograd conv at the 8-chunk cap, 3 nodes each: the
    decoder's graph, ggml's default 2048 nodes, must hold them) against the default chunking: the graph
    allocator's handling of the in-place chunk nodes, in a real model graph."""
    from conftest import model_gguf, rel_l2

    from pysdcpp import StableDiffusion

    latent = np.random.default_rng(4).standard_normal((2, 4, 32, 32)).astype(np.float32)
    with StableDiffusion(model_gguf("sd1"), threads=2) as sd:
        default = sd.decode(latent)
        small_chunks(128, 128, 1)
        chunked = sd.decode(latent)
    assert rel_l2(chunked, default) <= 1e-6


@pytest.mark.parametrize("algorithm", ["winograd_f4", "winograd_f2", "winograd_f4_fused"])
def test_the_gemm_tiles_give_equal_convolutions(algorithm):
    """Winograd's products through the narrow and the wide GEMM tiles: equal outputs (the same summation order)."""
    from pysdcpp.layers import gemm_tile

    x, w, b, pad = _problem((2, 300, 26, 30, 147, 1), seed=9)
    out = {}
    for tile in ("narrow", "wide"):
        with gemm_tile(tile):
            out[tile], _ = conv2d_3x3(x, w, b, pad=pad, algorithm=algorithm, threads=2)
    assert np.array_equal(out["narrow"], out["wide"])
