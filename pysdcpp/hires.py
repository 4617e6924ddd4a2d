"""Hires fix: generate at the given size, upscale (the latent, or the image by Lanczos, nearest or an ESRGAN
model), then denoise the upscaled result again for a share of the steps (A1111's and sd-cli's --hires). One spec:
`UPSCALER[:scale=2,steps=0,strength=0.7,width=W,height=H,tile=128]`, where UPSCALER is a name of UPSCALERS or a
path to an ESRGAN file; steps 0 repeats the generation's step count; width/height override scale.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

# our names -> stable-diffusion.cpp's sd_hires_upscaler_t values (its enum order, SD_HIRES_UPSCALER_LATENT = 1)
UPSCALERS = {"latent": 1, "latent-nearest": 2, "latent-nearest-exact": 3, "latent-antialiased": 4,
             "latent-bicubic": 5, "latent-bicubic-antialiased": 6, "lanczos": 7, "nearest": 8}
MODEL = 9   # SD_HIRES_UPSCALER_MODEL: an ESRGAN file
_KEYS = {"scale": float, "steps": int, "strength": float, "width": int, "height": int, "tile": int}


@dataclass(frozen=True)
class HiresFix:
    upscaler: str   # a name of UPSCALERS, or an ESRGAN file's path
    scale: float = 2.0
    steps: int = 0
    strength: float = 0.7
    width: int = 0
    height: int = 0
    tile: int = 128

    def spec(self) -> str:
        opts = [(k, getattr(self, k)) for k in _KEYS]
        defaults = HiresFix("latent")
        text = ",".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in opts
                        if v != getattr(defaults, k))
        return self.upscaler + (f":{text}" if text else "")

    def target(self, width: int, height: int) -> tuple[int, int]:
        """The final size of a `width` x `height` generation."""
        if self.width or self.height:
            return self.width or width, self.height or height
        return int(width * self.scale), int(height * self.scale)

    def apply(self, h, keep: list, ffi) -> None:
        """Write sd_hires_params_t (a generation's hires)."""
        h.enabled = True
        if self.upscaler in UPSCALERS:
            h.upscaler = UPSCALERS[self.upscaler]
        else:
            h.upscaler = MODEL
            keep.append(ffi.new("char[]", self.upscaler.encode("utf-8")))
            h.model_path = keep[-1]
        h.scale, h.steps, h.denoising_strength = float(self.scale), int(self.steps), float(self.strength)
        h.target_width, h.target_height, h.upscale_tile_size = int(self.width), int(self.height), int(self.tile)


def parse_hires(spec: str) -> HiresFix:
    """A hires-fix spec, checked (ValueError says what is wrong); an ESRGAN path must be a file."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError("hires_fix is a spec such as 'latent:scale=2,strength=0.6'")
    head, _, rest = spec.strip().partition(":")
    if head not in UPSCALERS and not Path(head).is_file():   # (a path with ':' in it cannot be named here)
        raise ValueError(f"hires upscaler {head!r}: one of {', '.join(UPSCALERS)} or an ESRGAN file")
    values = {}
    for item in filter(None, (x.strip() for x in rest.split(","))):
        key, eq, value = item.partition("=")
        if key not in _KEYS or not eq:
            raise ValueError(f"hires option {item!r}: the options are {', '.join(_KEYS)} (key=value)")
        try:
            values[key] = _KEYS[key](value)
        except ValueError:
            raise ValueError(f"hires option {key}: {value!r} is not a number") from None
    fix = HiresFix(head, **values)
    if not (math.isfinite(fix.scale) and 1 <= fix.scale <= 8):
        raise ValueError(f"hires scale must be between 1 and 8, got {fix.scale}")
    if not 0 < fix.strength <= 1:
        raise ValueError(f"hires strength must be in (0, 1], got {fix.strength}")
    if not 0 <= fix.steps <= 1000 or not 0 <= fix.tile <= 4096 or fix.width < 0 or fix.height < 0:
        raise ValueError("hires steps, tile, width and height must be non-negative (steps <= 1000)")
    if (fix.width % 8) or (fix.height % 8) or max(fix.width, fix.height) > 4096:
        raise ValueError("hires width and height must be multiples of 8 up to 4096")
    return fix
