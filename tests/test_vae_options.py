"""The VAE's options: a tiny autoencoder (`taesd=`, sd-cli's --taesd) and VAE tiling (`vae_tiling=`, sd-cli's
--vae-tiling/--vae-tile-size/--vae-tile-overlap). On the upstream library the image sd-cli makes, bit for bit
(text to image and img2img, whose encoder runs tiled or tiny too); the TAESD decode against diffusers'
AutoencoderTiny with the same weights; on the accelerated library within the PSNR its plain txt2img shows."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import assert_within_plain_psnr, psnr, sd_cli_image
from PIL import Image

from pysdcpp import ModelLoadError, StableDiffusion
from pysdcpp.api import png_parameters
from pysdcpp.converters import synthetic
from pysdcpp.vae_tiling import VaeTiling, parse_vae_tiling

SETTINGS = dict(prompt="a lighthouse at dusk", negative_prompt="blurry", width=64, height=64,
                num_inference_steps=2, guidance_scale=1.0, sampler="euler", seed=2024)
TILE = "4x4"   # latent pixels, the library's smallest: 2 x 2 tiles (and more with overlap) over a 64 px image's 8 x 8
CASES = {   # name: (constructor options, generate options, sd-cli arguments)
    "plain": ({}, {}, []),
    "taesd": ({"taesd": True}, {}, ["--taesd", None]),
    "tiled": ({}, {"vae_tiling": TILE}, ["--vae-tiling", "--vae-tile-size", TILE]),
    "tiled-overlap": ({}, {"vae_tiling": TILE, "vae_tile_overlap": 0.25},
                      ["--vae-tiling", "--vae-tile-size", TILE, "--vae-tile-overlap", "0.25"]),
    "taesd-img2img": ({"taesd": True}, {"image": True, "strength": 0.5}, ["--taesd", None, "-i", None,
                                                                          "--strength", "0.5"]),
    "tiled-img2img": ({}, {"vae_tiling": TILE, "image": True, "strength": 0.5},
                      ["--vae-tiling", "--vae-tile-size", TILE, "-i", None, "--strength", "0.5"]),
}



@pytest.fixture(scope="module")
def files(module_tmp):
    taesd = synthetic.write_tiny_autoencoder(module_tmp / "taesd.safetensors", seed=3)
    y, x = np.mgrid[0:64, 0:64] / 64
    init = module_tmp / "init.png"
    Image.fromarray((np.stack([x, y, (x + y) / 2], -1) * 255).astype(np.uint8), "RGB").save(init)
    return {"taesd": taesd, "image": init}


def _options(case: str, files) -> tuple[dict, dict]:
    ctor, gen, _ = CASES[case]
    ctor = {k: files[k] for k in ctor}
    gen = {k: (files[k] if v is True else v) for k, v in gen.items()}
    return ctor, gen


@pytest.fixture(scope="module")
def runs(sd15_f16, files):
    """Every case, in one context per backend and constructor option (the tiling options are generate()'s: one
    context draws each of them as sd-cli does afresh, which test_upstream_is_sd_cli checks)."""
    out = {}
    for backend in ("upstream", "accelerated"):
        for taesd in (False, True):
            cases = [c for c in CASES if ("taesd" in CASES[c][0]) == taesd]
            with StableDiffusion(sd15_f16, backend=backend, threads=2, **_options(cases[0], files)[0]) as sd:
                for case in cases:
                    out[backend, case] = sd.generate_with_info(**dict(SETTINGS, **_options(case, files)[1]))
    return out


@pytest.mark.slow
@pytest.mark.parametrize("case", [c for c in CASES if c != "plain"])
def test_upstream_is_sd_cli(runs, case, files, sd15_f16, tmp_path):
    args = list(CASES[case][2])
    for i, a in enumerate(args):
        if a is None:
            args[i] = str(files["taesd" if args[i - 1] == "--taesd" else "image"])
    np.testing.assert_array_equal(sd_cli_image(sd15_f16, SETTINGS, tmp_path, *args),
                                  np.asarray(runs["upstream", case].images[0]))


@pytest.mark.slow
def test_each_option_changes_the_decode(runs):
    plain = runs["upstream", "plain"].images[0]
    for case in ("taesd", "tiled", "tiled-overlap"):
        assert not np.array_equal(np.asarray(runs["upstream", case].images[0]), np.asarray(plain)), case
    # the same latent decoded in tiles: blended seams, not another picture
    for case in ("tiled", "tiled-overlap"):
        got = psnr(runs["upstream", case].images[0], plain)
        print(f"{case} against the untiled decode: {got:.1f} dB")
        assert got > 15


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES)
def test_accelerated_within_its_txt2img_psnr(runs, case):
    assert_within_plain_psnr(case, runs["accelerated", case].images[0], runs["upstream", case].images[0],
                             runs["accelerated", "plain"].images[0], runs["upstream", "plain"].images[0])


@pytest.mark.slow
def test_taesd_decode_against_diffusers(sd15_f16, files):
    """The component decode of a TAESD context against diffusers' AutoencoderTiny with the file's weights."""
    import torch
    from diffusers import AutoencoderTiny
    from safetensors.numpy import load_file

    from pysdcpp.format.families import TAE_CONFIG

    module = AutoencoderTiny.from_config(TAE_CONFIG)
    module.load_state_dict({k: torch.from_numpy(v.astype(np.float32)) for k, v in load_file(files["taesd"]).items()})
    latent = np.random.default_rng(8).standard_normal((1, 4, 16, 16)).astype(np.float32)
    with torch.no_grad():
        # diffusers' decode returns 0..1 mapped to -1..1, as our component decode does
        ref = module.decode(torch.from_numpy(latent)).sample.numpy()
    with StableDiffusion(sd15_f16, threads=2, taesd=files["taesd"]) as sd:
        got = sd.decode(latent)
    rel = np.linalg.norm(got - ref) / np.linalg.norm(ref)
    assert got.shape == ref.shape == (1, 3, 128, 128)
    assert rel < 1e-3, rel


@pytest.mark.slow
def test_png_records_the_tiling(runs):
    r = runs["upstream", "tiled-overlap"]
    assert r.params.vae_tiling == "4x4:overlap=0.25"
    assert "VAE tiling: 4x4:overlap=0.25" in png_parameters(r.params, "m", "upstream", "0")


def test_tiling_specs():
    assert parse_vae_tiling(True) == VaeTiling(32, 32, 0.5)
    assert parse_vae_tiling(16).spec() == "16x16"
    assert parse_vae_tiling((8, 12), 0.25).spec() == "8x12:overlap=0.25"
    assert parse_vae_tiling(" 24x16 : overlap=0.1 ") == VaeTiling(24, 16, 0.1)
    assert parse_vae_tiling(False) is None and parse_vae_tiling(None) is None
    for bad, message in [("8y8", "expected"), (2, "4..512"), ((8, 1000), "4..512"), ("8x8:overlap=1", "fraction"),
                         ("8x8:overlap=-0.5", "fraction"), ("8x8:overlap=nan", "expected"), (1.5, "must be True")]:
        with pytest.raises((ValueError, TypeError), match=message):
            parse_vae_tiling(bad)
    with pytest.raises(ValueError, match="needs vae_tiling"):
        parse_vae_tiling(None, 0.3)


def test_taesd_checked_before_loading(sd15_f16, tmp_path):
    with pytest.raises(ModelLoadError, match="no such file"):
        StableDiffusion(sd15_f16, taesd=tmp_path / "missing.safetensors")
    with pytest.raises(ModelLoadError, match="not a tiny autoencoder"):
        StableDiffusion(sd15_f16, taesd=sd15_f16)   # a whole model, no TAESD in it
