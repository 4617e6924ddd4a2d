"""The editing UNets: an inpainting model (9 input channels: the latent, the mask and the masked image's latent)
and an Instruct-Pix2Pix model (8: the latent and the image to edit's latent, with image guidance), each the SD1.5
fixture with its variant's conv_in over it as a UNet file (the synthetic weights are seeded by name, so the
variant differs from the fixture in that tensor alone). On the upstream library the image sd-cli makes with
--diffusion-model and the same inputs, bit for bit; on the accelerated library within its txt2img PSNR; the
arguments checked before any load."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import FIXTURE_SEED, assert_within_plain_psnr, sd_cli_image
from PIL import Image

from pysdcpp import StableDiffusion
from pysdcpp.api import checked_generation, png_parameters
from pysdcpp.converters import gguf_out, synthetic
from pysdcpp.format.names import UNET_PREFIX
from pysdcpp.modelfile import read_model_file, with_unet

SIZE = 64
SETTINGS = dict(prompt="a red boat on a lake", negative_prompt="", num_inference_steps=3, guidance_scale=6.0,
                sampler="euler", seed=31, width=SIZE, height=SIZE)


def _picture(seed: int) -> Image.Image:
    y, x = np.mgrid[0:SIZE, 0:SIZE] / SIZE
    rgb = np.stack([x, y, 0.5 + 0.5 * np.sin(7 * x + 4 * y + seed)], axis=-1)
    rgb += np.random.default_rng(seed).normal(0, 0.04, rgb.shape)
    return Image.fromarray((np.clip(rgb, 0, 1) * 255).round().astype(np.uint8), "RGB")


def _conv_in_file(variant: str, path):
    conv_in = [t for t in synthetic.map_unet(synthetic.synthetic_sources("sd1", FIXTURE_SEED, variant=variant)["unet"])
               if t.name == UNET_PREFIX + "input_blocks.0.0.weight"]
    gguf_out.write_gguf(path, conv_in, "f16", {})
    return path


@pytest.fixture(scope="module")
def files(module_tmp):
    out = {v: _conv_in_file(v, module_tmp / f"conv_in-{v}.gguf") for v in ("inpaint", "pix2pix")}
    for name, seed in (("image", 3), ("other", 4)):
        out[name] = module_tmp / f"{name}.png"
        _picture(seed).save(out[name])
    mask = np.zeros((SIZE, SIZE), np.uint8)
    mask[16:48, 8:40] = 255
    out["mask"] = module_tmp / "mask.png"
    Image.fromarray(mask, "L").save(out["mask"])
    return out


CASES = {
    "inpaint": ("inpaint", dict(image="image", mask_image="mask", strength=1.0)),
    "inpaint-other": ("inpaint", dict(image="other", mask_image="mask", strength=1.0)),
    "inpaint-img-cfg": ("inpaint", dict(image="image", mask_image="mask", strength=1.0, image_guidance_scale=2.0)),
    "pix2pix": ("pix2pix", dict(ref_images="image", image_guidance_scale=1.5)),
    "pix2pix-other": ("pix2pix", dict(ref_images="other", image_guidance_scale=1.5)),
    "pix2pix-default-img-cfg": ("pix2pix", dict(ref_images="image")),
}


def _inputs(case: str, files) -> dict:
    return {k: (files[v] if isinstance(v, str) else v) for k, v in CASES[case][1].items()}


@pytest.fixture(scope="module")
def runs(sd15_f16, files):
    out = {}
    for backend in ("upstream", "accelerated"):
        with StableDiffusion(sd15_f16, backend=backend, threads=2) as sd:
            out[backend, "txt2img"] = sd.generate_with_info(**SETTINGS)
        for variant in ("inpaint", "pix2pix"):
            with StableDiffusion(sd15_f16, unet=files[variant], backend=backend, threads=2) as sd:
                assert sd.in_channels == {"inpaint": 9, "pix2pix": 8}[variant]
                for case, (v, _) in CASES.items():
                    if v == variant and (backend == "upstream" or case in ("inpaint", "pix2pix")):
                        out[backend, case] = sd.generate_with_info(**SETTINGS, **_inputs(case, files))
    return out


def _cli_args(case: str, files) -> list[str]:
    args = ["--diffusion-model", str(files[CASES[case][0]])]
    for key, value in _inputs(case, files).items():
        flag = {"image": "-i", "mask_image": "--mask", "strength": "--strength", "ref_images": "-r",
                "image_guidance_scale": "--img-cfg-scale"}[key]
        args += [flag, str(value)]
    return args


@pytest.mark.slow
@pytest.mark.parametrize("case", [c for c in CASES if not c.endswith("-other")])   # another image: the same code
def test_upstream_is_sd_cli(runs, case, files, sd15_f16, tmp_path):
    cli = sd_cli_image(sd15_f16, SETTINGS, tmp_path, *_cli_args(case, files))
    np.testing.assert_array_equal(cli, np.asarray(runs["upstream", case].images[0]))


@pytest.mark.slow
def test_the_inputs_and_the_image_guidance_change_the_image(runs):
    def img(case):
        return np.asarray(runs["upstream", case].images[0], np.int16)

    for a, b in (("pix2pix", "pix2pix-other"), ("pix2pix", "pix2pix-default-img-cfg"), ("inpaint", "inpaint-other"),
                 ("inpaint", "inpaint-img-cfg")):
        assert np.abs(img(a) - img(b)).mean() > 2, (a, b)


@pytest.mark.slow
@pytest.mark.parametrize("case", ["inpaint", "pix2pix"])
def test_accelerated_within_its_txt2img_psnr(runs, case):
    assert_within_plain_psnr(case, runs["accelerated", case].images[0], runs["upstream", case].images[0],
                             runs["accelerated", "txt2img"].images[0], runs["upstream", "txt2img"].images[0])


@pytest.mark.slow
def test_png_records_the_edit(runs):
    r = runs["upstream", "pix2pix"]
    text = png_parameters(r.params, "m", "upstream", "0", images=r.images_in)
    assert "Edit images: 1" in text and "Image CFG scale: 1.5" in text


# -- checked before any load (headers only) ------------------------------------------------------------------------
def test_edit_arguments_need_a_pix2pix_model(sd15_f16, files):
    base = read_model_file(sd15_f16)
    for kwargs in (dict(ref_images=files["image"]), dict(image_guidance_scale=1.5)):
        with pytest.raises(ValueError, match="Instruct-Pix2Pix"):
            checked_generation(base, "upstream", "x", **kwargs)
    inpaint = with_unet(base, read_model_file(files["inpaint"]))
    with pytest.raises(ValueError, match="Instruct-Pix2Pix model"):
        checked_generation(inpaint, "upstream", "x", ref_images=files["image"])
    assert checked_generation(inpaint, "upstream", "x", image_guidance_scale=2.0).params.image_guidance_scale == 2
    pix2pix = with_unet(base, read_model_file(files["pix2pix"]))
    assert pix2pix.variant == "pix2pix"
    c = checked_generation(pix2pix, "upstream", "x", ref_images=[files["image"], np.zeros((8, 16, 3), np.uint8)])
    assert (c.params.width, c.params.height) == (SIZE, SIZE)   # from the first image
    assert [im.size for im in c.images.ref_images] == [(SIZE, SIZE), (16, 8)]
    for bad, err in ((dict(image_guidance_scale=float("nan")), "finite"), (dict(ref_images=[object()]), "PIL"),
                     (dict(ref_images=files["image"].with_name("missing.png")), "no such file")):
        with pytest.raises((ValueError, TypeError), match=err):
            checked_generation(pix2pix, "upstream", "x", **bad)
