"""VAE tiling: the VAE encodes and decodes the latent in overlapping tiles, which bounds its working memory at the
cost of a little time and seams blended away. One spec, as sd-cli's --vae-tiling/--vae-tile-size/--vae-tile-overlap
take it: `TXxTY:overlap=O`, tile sizes in latent pixels (8 image pixels each; sd-cli's default 32x32, 256 px), the
overlap a fraction of the tile (default 0.5). The library clamps a tile to the latent and to at least 4.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np

DEFAULT_TILE = 32
DEFAULT_OVERLAP = 0.5
_SPEC = re.compile(r"^\s*(\d+)(?:x(\d+))?\s*(?::\s*overlap\s*=\s*([0-9.eE+-]+))?\s*$")


@dataclass(frozen=True)
class VaeTiling:
    tile_x: int = DEFAULT_TILE
    tile_y: int = DEFAULT_TILE
    overlap: float = DEFAULT_OVERLAP

    def spec(self) -> str:
        return f"{self.tile_x}x{self.tile_y}" + ("" if self.overlap == DEFAULT_OVERLAP else f":overlap={self.overlap:g}")

    def apply(self, params) -> None:
        """Write sd_tiling_params_t (a generation's vae_tiling_params)."""
        params.enabled = True
        params.tile_size_x, params.tile_size_y = self.tile_x, self.tile_y
        params.target_overlap = float(self.overlap)
        params.rel_size_x = params.rel_size_y = 0.0


def parse_vae_tiling(value, overlap: float | None = None) -> VaeTiling | None:
    """The tiling a generate() argument asks for: False/None (none), True (sd-cli's defaults), a tile size in latent
    pixels (int, or (x, y)), or a spec string; `overlap` replaces the spec's."""
    if value is None or value is False:
        if overlap is not None:
            raise ValueError("vae_tile_overlap needs vae_tiling")
        return None
    if value is True:
        tiles = (DEFAULT_TILE, DEFAULT_TILE, DEFAULT_OVERLAP)
    elif isinstance(value, (int, np.integer)):
        tiles = (int(value), int(value), DEFAULT_OVERLAP)
    elif isinstance(value, (tuple, list)) and len(value) == 2 and all(
            isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in value):
        tiles = (int(value[0]), int(value[1]), DEFAULT_OVERLAP)
    elif isinstance(value, str):
        m = _SPEC.match(value)
        if not m:
            raise ValueError(f"vae_tiling {value!r}: expected TILE, TXxTY or TXxTY:overlap=O (tiles in latent pixels)")
        tx = int(m.group(1))
        try:
            o = float(m.group(3)) if m.group(3) else DEFAULT_OVERLAP
        except ValueError:
            raise ValueError(f"vae_tiling {value!r}: the overlap is not a number") from None
        tiles = (tx, int(m.group(2)) if m.group(2) else tx, o)
    else:
        raise TypeError(f"vae_tiling must be True, a tile size, (x, y) or a spec string, not {value!r}")
    tx, ty, o = tiles
    if overlap is not None:
        o = overlap
    if not (4 <= tx <= 512 and 4 <= ty <= 512):
        raise ValueError(f"VAE tiles must be 4..512 latent pixels a side, got {tx}x{ty}")
    if isinstance(o, bool) or not isinstance(o, (int, float)) or not math.isfinite(o) or not 0 <= o < 1:
        raise ValueError(f"the VAE tile overlap must be a fraction in [0, 1), got {o!r}")
    return VaeTiling(tx, ty, float(o))
