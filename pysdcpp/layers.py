"""Single layers through the accelerated library's graph nodes, with no model: for the kernel tests and
`pysdcpp bench --layers`."""

from __future__ import annotations

import numpy as np

from . import _native
from .errors import GenerationError

# Per-call convolution variants: names of pysdcpp_ext.h's enum pysdcpp_conv_t values (read through cffi).
CONV_VARIANTS = {"im2col": "PYSDCPP_CONV_IM2COL", "direct": "PYSDCPP_CONV_DIRECT",
                 "winograd_f4": "PYSDCPP_CONV_WINOGRAD_F4", "winograd_f2": "PYSDCPP_CONV_WINOGRAD_F2",
                 "winograd_f4_in_graph": "PYSDCPP_CONV_WINOGRAD_F4_IN_GRAPH",
                 "winograd_f4_ggml_gemm": "PYSDCPP_CONV_WINOGRAD_F4_GGML_GEMM",
                 "winograd_f4_scalar": "PYSDCPP_CONV_WINOGRAD_F4_SCALAR",
                 "winograd_f4_fused": "PYSDCPP_CONV_WINOGRAD_F4_FUSED",
                 "winograd_f2_fused": "PYSDCPP_CONV_WINOGRAD_F2_FUSED"}


def _run(lib, harness: str, last_error: str, *args) -> None:
    """Call one of the accelerated library's single-layer harnesses under its lock; a nonzero return raises the
    harness's last error."""
    with lib.lock:
        if getattr(lib.lib, harness)(*args) != 0:
            raise GenerationError(lib.ffi.string(getattr(lib.lib, last_error)()).decode())


def _bias(bias, n: int) -> np.ndarray | None:
    """A layer's optional bias as float32, checked to have one value per output channel."""
    b = None if bias is None else np.ascontiguousarray(bias, dtype=np.float32)
    if b is not None and b.shape != (n,):
        raise ValueError(f"bias must have shape ({n},), got {b.shape}")
    return b


def _timed(threads: int, repeat: int):
    """(the accelerated library, seconds per repetition) for one harness call; threads and repeat checked first."""
    if threads < 1 or repeat < 1:
        raise ValueError("threads and repeat must be at least 1")
    return _native.load("accelerated"), np.zeros(repeat, dtype=np.float64)


def _affine(c: int, gamma, beta, eps: float) -> tuple[np.ndarray, np.ndarray | None]:
    """A norm's per-channel scale and shift (beta may be None) as float32, checked against c channels and eps."""
    g = np.ascontiguousarray(gamma, dtype=np.float32)
    b = None if beta is None else np.ascontiguousarray(beta, dtype=np.float32)
    if g.shape != (c,) or (b is not None and b.shape != (c,)):
        raise ValueError(f"gamma and beta must have shape ({c},); got {g.shape} and {None if b is None else b.shape}")
    if not eps >= 0:
        raise ValueError(f"eps must be non-negative, got {eps!r}")
    return g, b


def conv_plan(n: int, c: int, h: int, w: int, k: int, pad: int = 1) -> str:
    """The per-call variant (a CONV_VARIANTS name) closest to what a model context with conv="winograd" runs for
    this 3x3 conv: the accelerated library's cost model. A `winograd_f4` or `winograd_f2` layer has its filter
    transform hoisted (cached within the budget, else in the graph); the `_fused` ones transform it inside the
    products; `im2col` keeps upstream's path."""
    lib = _native.load("accelerated")
    code = lib.lib.pysdcpp_conv_plan(n, c, h, w, k, pad)
    for name, const in CONV_VARIANTS.items():
        if getattr(lib.lib, const) == code:
            return name
    raise GenerationError(f"unknown convolution plan {code}")


def conv_routes(reset: bool = False) -> dict[str, int]:
    """How the accelerated library routed the eligible 3x3 stride-1 convs of the graphs built since the last
    reset (process-wide; every graph build counts, so a sampling loop counts each step): `im2col` (kept
    upstream's path), `cached`, `in_graph` or `fused` (Winograd, the filters cached, transformed in the graph,
    or transformed inside the products)."""
    lib = _native.load("accelerated")
    counts = lib.ffi.new("int64_t[4]")
    lib.lib.pysdcpp_conv_routes(counts, int(reset))
    return dict(zip(("im2col", "cached", "in_graph", "fused"), (int(c) for c in counts)))


def batched_guidance_steps(reset: bool = False) -> int:
    """How many guided steps the accelerated library ran as one batch-2 UNet evaluation (cond and uncond) since the
    last reset (process-wide)."""
    return int(_native.load("accelerated").lib.pysdcpp_guidance_batched_steps(int(reset)))


def conv2d_3x3(x: np.ndarray, w: np.ndarray, bias: np.ndarray | None = None, *, pad: int = 1,
               algorithm: str = "winograd_f4", weight_f16: bool = True, threads: int = 1,
               repeat: int = 1) -> tuple[np.ndarray, list[float]]:
    """y = conv2d(x, w) + bias, stride 1; x (N, C, H, W), w (K, C, 3, 3). Returns (y, seconds per repetition)."""
    if algorithm not in CONV_VARIANTS:
        raise ValueError(f"algorithm must be one of {', '.join(CONV_VARIANTS)}, not {algorithm!r}")
    x = np.ascontiguousarray(x, dtype=np.float32)
    w = np.ascontiguousarray(w, dtype=np.float32)
    if x.ndim != 4 or w.ndim != 4 or w.shape[1:] != (x.shape[1], 3, 3):
        raise ValueError(f"need x (N, C, H, W) and w (K, C, 3, 3); got {x.shape} and {w.shape}")
    if pad not in (0, 1):
        raise ValueError("pad must be 0 or 1")
    n, c, h, wd = x.shape
    k = w.shape[0]
    oh, ow = h + 2 * pad - 2, wd + 2 * pad - 2
    if oh < 1 or ow < 1:
        raise ValueError(f"input {h}x{wd} is too small for a 3x3 kernel with padding {pad}")
    b = _bias(bias, k)
    lib = _native.load("accelerated")
    ffi = lib.ffi
    y = np.empty((n, k, oh, ow), dtype=np.float32)
    secs = np.zeros(repeat, dtype=np.float64)
    _run(lib, "pysdcpp_conv2d_3x3", "pysdcpp_conv_last_error",
        ffi.from_buffer("float[]", x), n, c, h, wd, ffi.from_buffer("float[]", w), k,
        ffi.NULL if b is None else ffi.from_buffer("float[]", b), pad, int(weight_f16),
        getattr(lib.lib, CONV_VARIANTS[algorithm]), int(threads), int(repeat), ffi.from_buffer("float[]", y),
        ffi.from_buffer("double[]", secs))
    return y, secs.tolist()


# Per-call attention variants: names of pysdcpp_ext.h's enum pysdcpp_attention_t values.
ATTENTION_VARIANTS = {"upstream": "PYSDCPP_ATTN_UPSTREAM", "fast": "PYSDCPP_ATTN_FAST",
                      "fused": "PYSDCPP_ATTN_FUSED", "fused_scalar": "PYSDCPP_ATTN_FUSED_SCALAR",
                      "gemm": "PYSDCPP_ATTN_GEMM", "upstream_flash": "PYSDCPP_ATTN_UPSTREAM_FLASH"}


def attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, n_head: int, *, variant: str = "fast",
              threads: int = 1, repeat: int = 1) -> tuple[np.ndarray, list[float], int]:
    """softmax(q k^T / sqrt(d)) v per head; q (N, L_q, C), k and v (N, L_k, C) with C = n_head * d.

    Returns (output (N, L_q, C), seconds per repetition, compute-buffer bytes of the graph)."""
    if variant not in ATTENTION_VARIANTS:
        raise ValueError(f"variant must be one of {', '.join(ATTENTION_VARIANTS)}, not {variant!r}")
    q = np.ascontiguousarray(q, dtype=np.float32)
    k = np.ascontiguousarray(k, dtype=np.float32)
    v = np.ascontiguousarray(v, dtype=np.float32)
    if q.ndim != 3 or k.ndim != 3 or k.shape != v.shape or k.shape[0] != q.shape[0] or k.shape[2] != q.shape[2]:
        raise ValueError(f"need q (N, L_q, C) and k, v (N, L_k, C); got {q.shape}, {k.shape}, {v.shape}")
    n, lq, c = q.shape
    lk = k.shape[1]
    if n_head < 1 or c % n_head:
        raise ValueError(f"n_head must divide the channel count {c}; got {n_head}")
    lib, secs = _timed(threads, repeat)
    ffi = lib.ffi
    out = np.empty((n, lq, c), dtype=np.float32)
    nbytes = ffi.new("size_t*")
    _run(lib, "pysdcpp_attention", "pysdcpp_attention_last_error",
        ffi.from_buffer("float[]", q), ffi.from_buffer("float[]", k), ffi.from_buffer("float[]", v), n, lq, lk,
        c, n_head, getattr(lib.lib, ATTENTION_VARIANTS[variant]), int(threads), int(repeat),
        ffi.from_buffer("float[]", out), ffi.from_buffer("double[]", secs), nbytes)
    return out, secs.tolist(), int(nbytes[0])


# Register tiles of our GEMM's vector build: names of pysdcpp_ext.h's enum pysdcpp_gemm_tile_t values.
GEMM_TILES = {"auto": "PYSDCPP_GEMM_TILE_AUTO", "narrow": "PYSDCPP_GEMM_TILE_NARROW", "wide": "PYSDCPP_GEMM_TILE_WIDE"}


def gemm_tile_in_use() -> str:
    """The register tile the accelerated library's GEMM runs (every Winograd product, 1x1 conv and linear layer):
    "narrow" (6 x 16, 8-lane vectors) or "wide" (12 x 32, 16-lane: the default of AVX-512 builds)."""
    lib = _native.load("accelerated")
    return "wide" if lib.lib.pysdcpp_gemm_tile() == lib.lib.PYSDCPP_GEMM_TILE_WIDE else "narrow"


def set_gemm_tile(tile: str) -> None:
    """Run the accelerated library's GEMM with this tile ("auto", "narrow", "wide"), process-wide. Both tiles sum
    every output in the same order: their results are equal; only speed differs."""
    if tile not in GEMM_TILES:
        raise ValueError(f"tile must be one of {', '.join(GEMM_TILES)}, not {tile!r}")
    lib = _native.load("accelerated")
    with lib.lock:
        lib.lib.pysdcpp_set_gemm_tile(getattr(lib.lib, GEMM_TILES[tile]))


class gemm_tile:
    """`with gemm_tile("narrow"):` runs the block with that GEMM tile (set_gemm_tile), then restores the automatic
    choice."""

    def __init__(self, tile: str):
        if tile not in GEMM_TILES:
            raise ValueError(f"tile must be one of {', '.join(GEMM_TILES)}, not {tile!r}")
        self.tile = tile

    def __enter__(self):
        set_gemm_tile(self.tile)
        return self

    def __exit__(self, *exc) -> None:
        set_gemm_tile("auto")


# Per-call linear-layer paths: names of pysdcpp_ext.h's enum pysdcpp_linear_t values.
LINEAR_PATHS = {"upstream": "PYSDCPP_LINEAR_UPSTREAM", "fast": "PYSDCPP_LINEAR_FAST",
                "fast_scalar": "PYSDCPP_LINEAR_FAST_SCALAR"}


def linear(x: np.ndarray, w: np.ndarray, bias: np.ndarray | None = None, *, path: str = "fast",
           weight_f16: bool = True, threads: int = 1, repeat: int = 1) -> tuple[np.ndarray, list[float]]:
    """y = x w^T + bias; x (..., K), w (N, K), bias (N,). Returns (y (..., N), seconds per repetition)."""
    if path not in LINEAR_PATHS:
        raise ValueError(f"path must be one of {', '.join(LINEAR_PATHS)}, not {path!r}")
    x = np.ascontiguousarray(x, dtype=np.float32)
    w = np.ascontiguousarray(w, dtype=np.float32)
    if x.ndim < 1 or w.ndim != 2 or x.shape[-1] != w.shape[1]:
        raise ValueError(f"need x (..., K) and w (N, K); got {x.shape} and {w.shape}")
    if x.size == 0 or w.size == 0:
        raise ValueError(f"empty operands: x {x.shape}, w {w.shape}")
    n_out, k = w.shape
    b = _bias(bias, n_out)
    rows = x.size // k
    lib, secs = _timed(threads, repeat)
    ffi = lib.ffi
    y = np.empty(x.shape[:-1] + (n_out,), dtype=np.float32)
    _run(lib, "pysdcpp_linear", "pysdcpp_linear_last_error",
        ffi.from_buffer("float[]", x), rows, k, ffi.from_buffer("float[]", w), n_out,
        ffi.NULL if b is None else ffi.from_buffer("float[]", b), int(weight_f16),
        getattr(lib.lib, LINEAR_PATHS[path]), int(threads), int(repeat), ffi.from_buffer("float[]", y),
        ffi.from_buffer("double[]", secs))
    return y, secs.tolist()


# Per-call paths of the 1x1-conv and group-norm harnesses: names of pysdcpp_ext.h's enum pysdcpp_path_t values.
KERNEL_PATHS = {"upstream": "PYSDCPP_PATH_UPSTREAM", "fast": "PYSDCPP_PATH_FAST",
                "fast_scalar": "PYSDCPP_PATH_FAST_SCALAR"}


def _check_path(path: str) -> None:
    if path not in KERNEL_PATHS:
        raise ValueError(f"path must be one of {', '.join(KERNEL_PATHS)}, not {path!r}")


def conv2d_1x1(x: np.ndarray, w: np.ndarray, bias: np.ndarray | None = None, *, path: str = "fast",
               weight_f16: bool = True, threads: int = 1, repeat: int = 1) -> tuple[np.ndarray, list[float]]:
    """y = conv2d(x, w) + bias with a 1x1 kernel; x (N, C, H, W), w (K, C) or (K, C, 1, 1). Returns (y (N, K, H, W),
    seconds per repetition)."""
    _check_path(path)
    x = np.ascontiguousarray(x, dtype=np.float32)
    w = np.ascontiguousarray(w, dtype=np.float32)
    if w.ndim == 4 and w.shape[2:] == (1, 1):
        w = w.reshape(w.shape[:2])
    if x.ndim != 4 or w.ndim != 2 or w.shape[1] != x.shape[1] or x.size == 0 or w.size == 0:
        raise ValueError(f"need x (N, C, H, W) and w (K, C); got {x.shape} and {w.shape}")
    n, c, h, wd = x.shape
    k = w.shape[0]
    b = _bias(bias, k)
    lib, secs = _timed(threads, repeat)
    ffi = lib.ffi
    y = np.empty((n, k, h, wd), dtype=np.float32)
    _run(lib, "pysdcpp_conv2d_1x1", "pysdcpp_conv1x1_last_error",
        ffi.from_buffer("float[]", x), n, c, h, wd, ffi.from_buffer("float[]", w), k,
        ffi.NULL if b is None else ffi.from_buffer("float[]", b), int(weight_f16),
        getattr(lib.lib, KERNEL_PATHS[path]), int(threads), int(repeat), ffi.from_buffer("float[]", y),
        ffi.from_buffer("double[]", secs))
    return y, secs.tolist()


def group_norm(x: np.ndarray, groups: int, gamma: np.ndarray, beta: np.ndarray, *, eps: float = 1e-6,
               offset: np.ndarray | None = None, silu: bool = False, path: str = "fast", threads: int = 1,
               repeat: int = 1) -> tuple[np.ndarray, list[float]]:
    """Group normalisation of x (N, C, H, W) over `groups` groups of channels, then y = norm * gamma + beta per
    channel (upstream's eps is 1e-6). `offset` (N, C): added to x first, as a ResNet adds its time embedding;
    `silu`: SiLU of the result (both as upstream's ResNets build them around the norm). Returns (y, seconds per
    repetition)."""
    _check_path(path)
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 4 or x.size == 0:
        raise ValueError(f"need x (N, C, H, W); got {x.shape}")
    n, c, h, wd = x.shape
    if not isinstance(groups, (int, np.integer)) or groups < 1 or c % groups:
        raise ValueError(f"groups must divide the channel count {c}; got {groups!r}")
    if beta is None:
        raise ValueError("group_norm needs beta")
    g, b = _affine(c, gamma, beta, eps)
    o = None if offset is None else np.ascontiguousarray(offset, dtype=np.float32)
    if o is not None and o.shape != (n, c):
        raise ValueError(f"offset must have shape ({n}, {c}); got {o.shape}")
    lib, secs = _timed(threads, repeat)
    ffi = lib.ffi
    y = np.empty_like(x)
    _run(lib, "pysdcpp_group_norm", "pysdcpp_group_norm_last_error",
        ffi.from_buffer("float[]", x), n, c, h, wd, int(groups), float(eps), ffi.from_buffer("float[]", g),
        ffi.from_buffer("float[]", b), ffi.NULL if o is None else ffi.from_buffer("float[]", o), int(bool(silu)),
        getattr(lib.lib, KERNEL_PATHS[path]), int(threads), int(repeat), ffi.from_buffer("float[]", y),
        ffi.from_buffer("double[]", secs))
    return y, secs.tolist()


def geglu(p: np.ndarray, *, path: str = "fast", threads: int = 1,
          repeat: int = 1) -> tuple[np.ndarray, list[float]]:
    """GEGLU's gate on a feed-forward projection p (..., 2D): value * gelu(gate) with value = p[..., :D], gate =
    p[..., D:] and GELU's tanh form (path "upstream": ggml's ops as upstream's graph builds them). Returns (y (...,
    D), seconds per repetition)."""
    _check_path(path)
    p = np.ascontiguousarray(p, dtype=np.float32)
    if p.ndim < 1 or p.size == 0 or p.shape[-1] % 2:
        raise ValueError(f"need p (..., 2D) with an even last axis; got {p.shape}")
    d = p.shape[-1] // 2
    rows = p.size // p.shape[-1]
    lib, secs = _timed(threads, repeat)
    ffi = lib.ffi
    y = np.empty(p.shape[:-1] + (d,), dtype=np.float32)
    _run(lib, "pysdcpp_geglu", "pysdcpp_geglu_last_error", ffi.from_buffer("float[]", p), rows, d,
        getattr(lib.lib, KERNEL_PATHS[path]), int(threads), int(repeat), ffi.from_buffer("float[]", y),
        ffi.from_buffer("double[]", secs))
    return y, secs.tolist()


def layer_norm(x: np.ndarray, gamma: np.ndarray, beta: np.ndarray | None = None, *, eps: float = 1e-5,
               path: str = "fast", threads: int = 1, repeat: int = 1) -> tuple[np.ndarray, list[float]]:
    """Layer normalisation of x (..., C) over its last axis, then y = norm * gamma + beta (upstream's eps is
    1e-5). Returns (y, seconds per repetition)."""
    _check_path(path)
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim < 1 or x.size == 0:
        raise ValueError(f"need x (..., C); got {x.shape}")
    c = x.shape[-1]
    g, b = _affine(c, gamma, beta, eps)
    lib, secs = _timed(threads, repeat)
    ffi = lib.ffi
    y = np.empty_like(x)
    _run(lib, "pysdcpp_layer_norm", "pysdcpp_layer_norm_last_error", ffi.from_buffer("float[]", x), x.size // c, c,
        float(eps), ffi.from_buffer("float[]", g), ffi.NULL if b is None else ffi.from_buffer("float[]", b),
        getattr(lib.lib, KERNEL_PATHS[path]), int(threads), int(repeat), ffi.from_buffer("float[]", y),
        ffi.from_buffer("double[]", secs))
    return y, secs.tolist()
