"""Single layers through the accelerated library's graph nodes, with no model: for the kernel tests and
`pysdcpp bench --layers`."""

from __future__ import annotations

import numpy as np

from . import _native
from .errors import GenerationError

# Per-call convolution variants: names of pysdcpp_ext.h's enum pysdcpp_conv_t values (read through cffi).
CONV_VARIANTS = {"im2col": "PYSDCPP_CONV_IM2COL", "direct": "PYSDCPP_CONV_DIRECT",
                 "winograd_f4": "PYSDCPP_CONV_WINOGRAD_F4", "winograd_f2": "PYSDCPP_CONV_WINOGRAD_F2"}


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
    b = None if bias is None else np.ascontiguousarray(bias, dtype=np.float32)
    if b is not None and b.shape != (k,):
        raise ValueError(f"bias must have shape ({k},), got {b.shape}")
    lib = _native.load("accelerated")
    ffi = lib.ffi
    y = np.empty((n, k, oh, ow), dtype=np.float32)
    secs = np.zeros(repeat, dtype=np.float64)
    with lib.lock:
        rc = lib.lib.pysdcpp_conv2d_3x3(
            ffi.from_buffer("float[]", x), n, c, h, wd, ffi.from_buffer("float[]", w), k,
            ffi.NULL if b is None else ffi.from_buffer("float[]", b), pad, int(weight_f16),
            getattr(lib.lib, CONV_VARIANTS[algorithm]), int(threads), int(repeat), ffi.from_buffer("float[]", y),
            ffi.from_buffer("double[]", secs))
        if rc != 0:
            raise GenerationError(ffi.string(lib.lib.pysdcpp_conv_last_error()).decode())
    return y, secs.tolist()
