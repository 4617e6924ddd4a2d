"""img2img and inpainting through `generate(image=, strength=, mask_image=)`: on the upstream library the image
sd-cli makes with -i/--strength/--mask, bit for bit; on the accelerated library with its defaults within the
PSNR its txt2img shows at the same settings; the inputs checked before any load; sizes taken from the image."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import assert_within_plain_psnr, sd_cli_image
from PIL import Image

from pysdcpp import StableDiffusion
from pysdcpp.api import checked_generation, png_parameters
from pysdcpp.images import read_image
from pysdcpp.modelfile import read_model_file

SETTINGS = dict(prompt="a lighthouse at dusk", negative_prompt="blurry", num_inference_steps=6, guidance_scale=1.0,
                sampler="euler", seed=777)
SIZE = 64   # 8x8 latent pixels: every UNet level, and room for a mask with a far region beside it
CASES = {"img2img": dict(strength=0.6), "inpaint": dict(strength=0.75, mask=True), "img2img-full": dict(strength=1.0)}


def _init_image() -> Image.Image:
    """A deterministic picture-like input: smooth colour gradients, a disc and some texture."""
    y, x = np.mgrid[0:SIZE, 0:SIZE] / SIZE
    rgb = np.stack([x, y, 0.5 + 0.5 * np.sin(6 * x + 3 * y)], axis=-1)
    rgb[(x - 0.6) ** 2 + (y - 0.4) ** 2 < 0.05] = (0.9, 0.2, 0.1)
    rgb += np.random.default_rng(5).normal(0, 0.03, rgb.shape)
    return Image.fromarray((np.clip(rgb, 0, 1) * 255).round().astype(np.uint8), "RGB")


def _mask() -> Image.Image:
    m = np.zeros((SIZE, SIZE), np.uint8)
    m[4:20, 4:20] = 255   # repaint a box (2x2 latent pixels), keep the rest
    return Image.fromarray(m, "L")



@pytest.fixture(scope="module")
def inputs(module_tmp):
    image, mask = module_tmp / "init.png", module_tmp / "mask.png"
    _init_image().save(image)
    _mask().save(mask)
    return image, mask


def _kwargs(case: str, inputs) -> dict:
    c = CASES[case]
    return dict(SETTINGS, image=inputs[0], strength=c["strength"], mask_image=inputs[1] if c.get("mask") else None)


@pytest.fixture(scope="module")
def runs(sd15_f16, inputs):
    out = {}
    for backend in ("upstream", "accelerated"):
        with StableDiffusion(sd15_f16, backend=backend, threads=2) as sd:
            out[backend, "txt2img"] = sd.generate_with_info(width=SIZE, height=SIZE, **SETTINGS)
            for case in CASES:
                steps = []
                out[backend, case] = sd.generate_with_info(callback=lambda i, n, s: steps.append(n),
                                                           **_kwargs(case, inputs))
                out[backend, case].steps_seen = steps
            if backend == "upstream":
                out[backend, "inpaint-seed2"] = sd.generate_with_info(**dict(_kwargs("inpaint", inputs), seed=778))
    return out


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES)
def test_upstream_is_sd_cli(runs, case, inputs, sd15_f16, tmp_path):
    c = CASES[case]
    extra = ["-i", str(inputs[0]), "--strength", str(c["strength"])] + (["--mask", str(inputs[1])]
                                                                       if c.get("mask") else [])
    cli = sd_cli_image(sd15_f16, SETTINGS, tmp_path, *extra)   # no -W/-H: the image's size
    ours = runs["upstream", case]
    assert ours.images[0].size == (SIZE, SIZE)
    np.testing.assert_array_equal(cli, np.asarray(ours.images[0]))


@pytest.mark.slow
def test_strength_sets_the_steps_and_the_image_matters(runs):
    # upstream keeps the last int(steps * strength) + 1 sigmas' steps below 1 (diffusers runs int(steps * strength)),
    # and every step at strength 1
    assert runs["upstream", "img2img"].steps_seen[-1] == int(6 * 0.6) + 1
    assert runs["upstream", "inpaint"].steps_seen[-1] == int(6 * 0.75) + 1
    assert runs["upstream", "img2img-full"].steps_seen[-1] == 6
    txt = np.asarray(runs["upstream", "txt2img"].images[0], np.int16)
    for case in ("img2img", "inpaint"):
        assert np.abs(np.asarray(runs["upstream", case].images[0], np.int16) - txt).mean() > 5
    # at strength 1 the image is noised at the largest sigma (about 14.6 against latents of about 1): little of it
    # is left, and the result is near the text-to-image one
    full = np.abs(np.asarray(runs["upstream", "img2img-full"].images[0], np.int16) - txt).mean()
    assert 0 < full < 5


@pytest.mark.slow
def test_inpainting_keeps_the_unmasked_region(runs):
    """A plain model keeps the unmasked latent at every step: two seeds repaint the box differently and leave the
    rest the same, up to the decoder's reach across the mask's edge (the latent mask is dilated to whole latent
    pixels; the decoder's receptive field spreads a difference a few latent pixels further)."""
    a = np.asarray(runs["upstream", "inpaint"].images[0], np.float64)
    b = np.asarray(runs["upstream", "inpaint-seed2"].images[0], np.float64)
    diff = np.abs(a - b).mean(axis=2)
    inside = np.asarray(_mask()) > 127
    far = np.ones_like(inside)
    far[:20 + 24, :20 + 24] = False   # 3 latent pixels or more from the box
    assert diff[inside].mean() > 10
    assert diff[far].mean() < 0.2 * diff[inside].mean()


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES)
def test_accelerated_within_its_txt2img_psnr(runs, case):
    assert_within_plain_psnr(case, runs["accelerated", case].images[0], runs["upstream", case].images[0],
                             runs["accelerated", "txt2img"].images[0], runs["upstream", "txt2img"].images[0])


@pytest.mark.slow
def test_png_records_the_strength(runs):
    r = runs["upstream", "inpaint"]
    text = png_parameters(r.params, "m", "upstream", "0", images=r.images_in)
    assert "Denoising strength: 0.75" in text and "Inpaint: masked" in text
    assert "Denoising strength" not in png_parameters(runs["upstream", "txt2img"].params, "m", "upstream", "0")


# -- inputs checked before any model loads (the file's header only) -------------------------------------------------
@pytest.fixture(scope="module")
def header(sd15_f16):
    return read_model_file(sd15_f16)


def test_size_defaults_to_the_image_rounded_to_the_model_multiple(header):
    c = checked_generation(header, "upstream", "x", image=np.zeros((200, 300, 3), np.uint8))
    assert (c.params.width, c.params.height) == (256, 192)
    assert c.images.image.size == (256, 192)
    c = checked_generation(header, "upstream", "x", image=Image.new("RGB", (100, 80)), width=128, height=64,
                           mask_image=np.ones((80, 100), np.float32))
    assert c.images.image.size == c.images.mask_image.size == (128, 64)
    assert c.images.mask_image.mode == "L" and np.asarray(c.images.mask_image).min() == 255
    assert checked_generation(header, "upstream", "x").images.image is None


@pytest.mark.parametrize("kwargs, message", [
    (dict(mask_image=np.zeros((8, 8), np.uint8)), "needs an image"),
    (dict(image=np.zeros((8, 8, 3), np.uint8), strength=0), "strength"),
    (dict(image=np.zeros((8, 8, 3), np.uint8), strength=1.5), "strength"),
    (dict(image=np.zeros((8, 8, 3), np.uint8), strength="high"), "strength"),
    (dict(image=np.zeros((8, 8, 2), np.uint8)), "shape"),
    (dict(image=np.full((8, 8, 3), 2.0)), "0..1"),
    (dict(image=np.zeros((8, 8, 3), np.int64)), "uint8"),
    (dict(image=[[0, 1]]), "PIL image"),
    (dict(image="/nonexistent/in.png"), "no such file"),
    (dict(num_images_per_prompt=2, batch_size=3), "same setting"),
])
def test_bad_inputs_fail_before_loading(header, kwargs, message):
    with pytest.raises((ValueError, TypeError), match=message):
        checked_generation(header, "upstream", "x", **kwargs)


def test_corrupt_image_file(tmp_path, header):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(ValueError, match="not a readable image"):
        read_image(bad, "image")
    with pytest.raises(ValueError, match="not a readable image"):
        checked_generation(header, "upstream", "x", image=bad)


def test_negative_seed_draws_one_and_aliases(header):
    seeds = {checked_generation(header, "upstream", "x", seed=-1).params.seed for _ in range(4)}
    seeds.add(checked_generation(header, "upstream", "x", seed=None).params.seed)
    assert all(0 <= s < 2**31 for s in seeds) and len(seeds) > 1
    assert checked_generation(header, "upstream", "x", seed=5).params.seed == 5
    assert checked_generation(header, "upstream", "x", num_images_per_prompt=3).params.batch_size == 3
