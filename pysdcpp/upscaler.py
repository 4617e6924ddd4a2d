"""`Upscaler`: an ESRGAN model (RRDBNet: Real-ESRGAN x4plus and its kin, x2 and x1 too) in stable-diffusion.cpp's
upscaler context, PIL in and out; sd-cli's --upscale-model.

    with Upscaler("RealESRGAN_x4plus.safetensors") as up:
        big = up.upscale(image)          # 4x the size
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image

from . import _native
from .api import CONV_ALGORITHMS, DEFAULT_CONV, NativeHandle, _kernel_choice, _threads, take_image
from .errors import GenerationError, ModelLoadError, PySDCppError
from .images import read_image
from .modelfile import read_model_file


def check_esrgan_file(path) -> None:
    """A readable RRDBNet (ESRGAN) file, or ModelLoadError before anything loads."""
    mf = read_model_file(path)
    names = {t.name for t in mf.tensors}
    if not ({"conv_first.weight", "model.0.weight"} & names):
        raise ModelLoadError(f"{mf.path}: not an ESRGAN model (RRDBNet: conv_first/body/conv_up or model.N tensors)")


class Upscaler(NativeHandle):
    """An ESRGAN upscaler in one of the two native libraries; close it (or use `with`) to free its memory.
    `tile_size`: the image is upscaled in tiles of this many input pixels (sd-cli's default 128; 0: whole)."""

    def __init__(self, model: str | os.PathLike, *, threads: int | None = None, backend: str = "accelerated",
                 tile_size: int = 128, conv: str = "default"):
        self._ctx = None
        if backend not in _native.BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(_native.BACKENDS)}, not {backend!r}")
        if isinstance(tile_size, bool) or not isinstance(tile_size, (int, np.integer)) or not 0 <= tile_size <= 4096:
            raise ValueError(f"tile_size must be 0 (no tiles) or a size up to 4096, got {tile_size!r}")
        self.conv = _kernel_choice("conv", conv, CONV_ALGORITHMS, DEFAULT_CONV, backend)
        check_esrgan_file(model)
        self.model = Path(model)
        self.backend = backend
        self.native = _native.load(backend)
        self.threads = _threads(threads, self.native)
        lib, ffi = self.native.lib, self.native.ffi
        with self.native.lock:
            self.native.take_errors()
            ctx = lib.new_upscaler_ctx(str(model).encode("utf-8"), False, self.conv == "direct", self.threads,
                                       int(tile_size))
        if ctx == ffi.NULL:
            raise ModelLoadError(f"could not load {model}: {self.native.take_errors() or 'see the log'}")
        self._ctx = ctx

    @property
    def factor(self) -> int:
        """How many times larger the output is (the model's scale, 1, 2 or 4)."""
        return int(self.native.lib.get_upscale_factor(self._require_open()))

    def _require_open(self):
        if self._ctx is None:
            raise PySDCppError("this Upscaler is closed")
        return self._ctx

    def upscale(self, image) -> Image.Image:
        """`image` (PIL, numpy or a path, used as RGB) at `factor` times its size."""
        img = read_image(image, "image")
        ctx = self._require_open()
        ffi, lib = self.native.ffi, self.native.lib
        arr = np.ascontiguousarray(np.asarray(img, dtype=np.uint8))
        src = ffi.new("sd_image_t*")
        src.width, src.height, src.channel = img.width, img.height, 3
        src.data = ffi.cast("uint8_t*", ffi.from_buffer(arr))
        with self.native.lock:
            if self.native.has_components:   # the conv hook reads a process-wide setting
                lib.pysdcpp_set_conv_algorithm(lib.PYSDCPP_CONV_WINOGRAD_F4 if self.conv == "winograd"
                                               else lib.PYSDCPP_CONV_IM2COL)
                lib.pysdcpp_set_winograd_threads(self.threads)
            self.native.take_errors()
            out = lib.upscale(ctx, src[0], self.factor)
        result = take_image(ffi, out)
        if result is None:
            raise GenerationError(f"upscaling failed: {self.native.take_errors() or 'see the log'}")
        return result

    def close(self) -> None:
        if self._ctx is not None:
            with self.native.lock:
                self.native.lib.free_upscaler_ctx(self._ctx)
                if self.native.has_components:
                    self.native.lib.pysdcpp_winograd_cache_clear()
            self._ctx = None
