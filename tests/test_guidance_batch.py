"""Batched guidance (patch 0016): a guided step's cond and uncond as one batch-2 UNet evaluation. On upstream's
kernels it draws upstream's image within one level per pixel (ggml's kernels order some sums by the batch's
shape), on the accelerated defaults the image of two separate evaluations within their PSNR; the steps it batches
are counted, and the steps where something tells cond and uncond apart (no guidance, a step cache, conditions of
different lengths) run separately, as upstream."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import psnr
from pysdcpp import StableDiffusion
from pysdcpp.layers import batched_guidance_steps

SETTINGS = dict(prompt="a lighthouse at dusk", negative_prompt="blurry", width=128, height=128,
                num_inference_steps=3, guidance_scale=7.0, sampler="euler", seed=77)
OFF = dict(conv="im2col", attention="upstream", linear="upstream")   # upstream's kernels
LONG = "a lighthouse at dusk, " * 20   # past 77 tokens: two chunks against the negative prompt's one


def _image(sd, **kw) -> tuple[np.ndarray, int]:
    batched_guidance_steps(reset=True)
    img = np.asarray(sd.generate(**{**SETTINGS, **kw})[0])
    return img, batched_guidance_steps(reset=True)


@pytest.fixture(scope="module")
def upstream_images(sd15_f16):
    with StableDiffusion(sd15_f16, backend="upstream", threads=2) as sd:
        return {"plain": np.asarray(sd.generate(**SETTINGS)[0]),
                "long": np.asarray(sd.generate(**{**SETTINGS, "prompt": LONG})[0])}


def test_batched_on_upstream_kernels_is_upstream(sd15_f16, upstream_images):
    with StableDiffusion(sd15_f16, threads=2, batch_guidance=True, **OFF) as sd:
        img, batched = _image(sd)
        long_img, long_batched = _image(sd, prompt=LONG)
        _, unguided = _image(sd, guidance_scale=1.0)
        _, cached = _image(sd, step_cache="ucache")
    assert batched == SETTINGS["num_inference_steps"]
    assert img.std() > 0
    d = np.abs(img.astype(np.int16) - upstream_images["plain"].astype(np.int16))
    print(f"batched vs upstream: max |diff| {d.max()}, PSNR {psnr(img, upstream_images['plain']):.1f} dB")
    assert d.max() <= 1   # ggml's kernels per image row; cond and uncond in their places
    # prompt and negative prompt of different lengths, no guidance, a step cache: separate evaluations
    assert (long_batched, unguided, cached) == (0, 0, 0)
    np.testing.assert_array_equal(long_img, upstream_images["long"])


def test_batched_on_accelerated_defaults(sd15_f16):
    with StableDiffusion(sd15_f16, threads=2) as sd:
        assert sd.batch_guidance
        batched, n = _image(sd)
    with StableDiffusion(sd15_f16, threads=2, batch_guidance=False) as sd:
        separate, m = _image(sd)
    assert (n, m) == (SETTINGS["num_inference_steps"], 0)
    # at 128 px batch 2 has 512 rows at the 16x16 level: our GEMM takes layers ggml's path keeps at batch 1
    got = psnr(batched, separate)
    print(f"batched vs separate, accelerated defaults: {got:.1f} dB")
    assert got >= 40.0


@pytest.mark.parametrize("bad, message", [({"backend": "upstream", "batch_guidance": True}, "accelerated library"),
                                          ({"batch_guidance": "yes"}, "True, False or None")])
def test_bad_batch_guidance(sd15_f16, bad, message):
    with pytest.raises(ValueError, match=message):
        StableDiffusion(sd15_f16, **bad)
