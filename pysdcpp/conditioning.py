"""SDXL's extra UNet input y: the pooled text embedding and the size conditioning (original size, crop corner, target
size, each number embedded in 256 sinusoids), built for any sizes; stable-diffusion.cpp's generation fixes
original = target = the image size and crop = 0."""

from __future__ import annotations

import numpy as np

SIZE_EMBED_WIDTH = 256   # diffusers' addition_time_embed_dim for SDXL


def sinusoids(numbers, width: int = SIZE_EMBED_WIDTH) -> np.ndarray:
    """Each number as `width` sinusoids, cosines first (diffusers' Timesteps with flip_sin_to_cos, shift 0), in
    float32 arithmetic like stable-diffusion.cpp's timestep_embedding."""
    half = width // 2
    freqs = np.exp(-np.log(10000.0) * np.arange(half, dtype=np.float64) / half).astype(np.float32)
    args = np.asarray(numbers, dtype=np.float32)[:, None] * freqs[None, :]
    return np.concatenate([np.cos(args), np.sin(args)], axis=1).astype(np.float32)


def size_conditioning(pooled: np.ndarray, original_size: tuple[int, int], target_size: tuple[int, int],
                      crop_top_left: tuple[int, int] = (0, 0)) -> np.ndarray:
    """y (N, 2816) for SDXL's UNet from the pooled text embedding (N, 1280) (the first 1280 entries of
    `encode_prompt(..., return_y=True)`'s y) and (height, width) sizes: [pooled, orig h, orig w, crop top, crop left,
    target h, target w] with each number as 256 sinusoids."""
    pooled = np.asarray(pooled, dtype=np.float32)
    if pooled.ndim == 1:
        pooled = pooled[None]
    if pooled.ndim != 2:
        raise ValueError(f"pooled must have shape (N, width), got {pooled.shape}")
    for name, pair in (("original_size", original_size), ("target_size", target_size),
                       ("crop_top_left", crop_top_left)):
        if len(pair) != 2 or not all(isinstance(v, (int, np.integer)) and v >= 0 for v in pair):
            raise ValueError(f"{name} must be two non-negative integers (height, width), got {pair!r}")
    numbers = [*original_size, *crop_top_left, *target_size]
    tail = sinusoids(numbers).reshape(1, -1)
    return np.concatenate([pooled, np.repeat(tail, len(pooled), axis=0)], axis=1)
