"""ControlNet (`StableDiffusion(control_net=)`, `generate(control_image=, controlnet_conditioning_scale=)`): a
random-weight ControlNet in the real SD1.5 architecture; on the upstream library the image sd-cli makes with
--control-net/--control-image/--control-strength, bit for bit, at two weights; the hint changes the image; on the
accelerated library within the PSNR its plain txt2img shows; bad files and a hint without a ControlNet refused
before anything runs."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import assert_within_plain_psnr, psnr, sd_cli_image
from PIL import Image

from pysdcpp import ModelLoadError, StableDiffusion

SETTINGS = dict(prompt="a lighthouse at dusk", negative_prompt="blurry", width=64, height=64,
                num_inference_steps=2, guidance_scale=7.0, sampler="euler", seed=55)
SCALES = (0.9, 1.5)



@pytest.fixture(scope="module")
def hint(module_tmp):
    """An edge map, as a canny ControlNet takes: white lines on black."""
    a = np.zeros((64, 64, 3), np.uint8)
    a[10:11, 5:59] = a[50:51, 5:59] = 255
    a[10:51, 5:6] = a[10:51, 58:59] = 255
    yy, xx = np.mgrid[0:64, 0:64]
    a[np.abs(np.hypot(yy - 30, xx - 32) - 12) < 0.8] = 255
    path = module_tmp / "hint.png"
    Image.fromarray(a, "RGB").save(path)
    return path


@pytest.fixture(scope="module")
def runs(sd15_f16, controlnet_sd15, hint):
    out = {}
    for backend in ("upstream", "accelerated"):
        with StableDiffusion(sd15_f16, backend=backend, threads=2) as sd:
            out[backend, None] = sd.generate(**SETTINGS)[0]
            with pytest.raises(ValueError, match="needs a ControlNet"):   # a hint, but no ControlNet loaded
                sd.generate(control_image=hint, **SETTINGS)
        with StableDiffusion(sd15_f16, backend=backend, threads=2, control_net=controlnet_sd15) as sd:
            for scale in SCALES:
                r = sd.generate_with_info(control_image=hint, controlnet_conditioning_scale=scale, **SETTINGS)
                out[backend, scale] = r.images[0]
                out[backend, scale, "params"] = r
            out[backend, "unused"] = sd.generate(**SETTINGS)[0]   # loaded, no hint: the plain image
    return out


@pytest.mark.slow
@pytest.mark.parametrize("scale", SCALES)
def test_upstream_is_sd_cli(runs, scale, sd15_f16, controlnet_sd15, hint, tmp_path):
    cli = sd_cli_image(sd15_f16, SETTINGS, tmp_path, "--control-net", str(controlnet_sd15), "--control-image",
                       str(hint), "--control-strength", str(scale))
    np.testing.assert_array_equal(cli, np.asarray(runs["upstream", scale]))


@pytest.mark.slow
def test_the_hint_and_its_weight_change_the_image(runs):
    plain = runs["upstream", None]
    np.testing.assert_array_equal(np.asarray(runs["upstream", "unused"]), np.asarray(plain))
    assert psnr(runs["upstream", 0.9], plain) < 30
    assert psnr(runs["upstream", 1.5], runs["upstream", 0.9]) < 35


@pytest.mark.slow
@pytest.mark.parametrize("scale", SCALES)
def test_accelerated_within_its_txt2img_psnr(runs, scale):
    assert_within_plain_psnr(f"ControlNet weight {scale}", runs["accelerated", scale], runs["upstream", scale],
                             runs["accelerated", None], runs["upstream", None])


@pytest.mark.slow
def test_png_records_the_weight(runs):
    from pysdcpp.api import png_parameters

    r = runs["upstream", 1.5, "params"]
    assert "ControlNet weight: 1.5" in png_parameters(r.params, "m", "upstream", "0", images=r.images_in)


def test_refused_before_anything_runs(sd15_f16, tmp_path):
    with pytest.raises(ModelLoadError, match="not a ControlNet"):
        StableDiffusion(sd15_f16, control_net=sd15_f16)
    with pytest.raises(ModelLoadError, match="no such file"):
        StableDiffusion(sd15_f16, control_net=tmp_path / "missing.safetensors")
    from pysdcpp.api import checked_generation
    from pysdcpp.modelfile import read_model_file

    with pytest.raises(ValueError, match="controlnet_conditioning_scale"):
        checked_generation(read_model_file(sd15_f16), "upstream", "x", control_image=np.zeros((8, 8, 3), np.uint8),
                           controlnet_conditioning_scale=float("inf"))
    c = checked_generation(read_model_file(sd15_f16), "upstream", "x", control_image=np.zeros((200, 130, 3),
                                                                                               np.uint8))
    assert (c.params.width, c.params.height) == (128, 192) and c.images.control_image.size == (128, 192)
