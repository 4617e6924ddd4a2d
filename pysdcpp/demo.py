"""The embedded default model: a synthetic SD1.5 (random weights, real architecture), made once and cached."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

from converters import keys
from converters.gguf_out import write_gguf
from converters.sd_layout import map_text_encoder, map_unet, map_vae
from converters.synthetic import synthetic_sources

DEMO_SEED = 0


def cache_dir() -> Path:
    env = os.environ.get("PYSDCPP_CACHE_DIR")
    base = Path(env) if env else Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "pysdcpp"
    return base


def synthetic_gguf(family: str = "sd1", out_type: str = "f16", seed: int = DEMO_SEED,
                   folder: Path | None = None, progress: Callable[[int, int, str], None] | None = None) -> Path:
    """Path of the synthetic model's GGUF, writing it first if it is not cached yet."""
    folder = Path(folder) if folder else cache_dir() / "models"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"synthetic-{family}-seed{seed}-{out_type}.gguf"
    if path.is_file():
        return path
    parts = synthetic_sources(family, seed)
    tensors = map_unet(parts["unet"]) + map_vae(parts["vae"]) + map_text_encoder(parts["text_encoder"])
    meta = {keys.FAMILY: family, keys.SOURCE: f"synthetic {family} seed {seed}", keys.SOURCE_LAYOUT: "synthetic",
            keys.OUTPUT_TYPE: out_type, keys.SYNTHETIC: True, keys.PREDICTION: "eps" if family == "sd1" else "v"}
    write_gguf(path, tensors, out_type, meta, progress)
    return path
