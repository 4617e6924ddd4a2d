"""The sampler's options, the hires fix and textual inversion: `eta=`, custom `sigmas=`, `hires_fix=` and
`embeddings=` (a folder, as sd-cli's --embd-dir): on the upstream library the image sd-cli makes with --eta,
--sigmas, --hires... and --embd-dir, bit for bit; each
changes the image; the accelerated library within the PSNR its plain txt2img shows; nonsense refused before load."""

from __future__ import annotations

import re

import numpy as np
import pytest
from conftest import assert_within_plain_psnr, psnr, sd_cli_image

from pysdcpp import StableDiffusion
from pysdcpp.api import checked_generation, png_parameters
from pysdcpp.modelfile import read_model_file

SETTINGS = dict(negative_prompt="blurry", width=64, height=64, num_inference_steps=4, guidance_scale=1.0,
                seed=808)
SIGMAS = (14.6, 6.0, 2.0, 0.5, 0.0)
CASES = {   # name: (prompt, generate options, sd-cli arguments)
    "plain": ("a lighthouse at dusk", dict(sampler="euler_a"), ["--sampling-method", "euler_a"]),
    "eta": ("a lighthouse at dusk", dict(sampler="euler_a", eta=0.4), ["--sampling-method", "euler_a",
                                                                       "--eta", "0.4"]),
    "sigmas": ("a lighthouse at dusk", dict(sampler="euler", sigmas=SIGMAS, num_inference_steps=None),
               ["--sampling-method", "euler", "--sigmas", ",".join(map(str, SIGMAS))]),
    "embedding": ("a lighthouse at dusk in lumenstyle", dict(sampler="euler_a"), ["--sampling-method", "euler_a"]),
    # 64 px, then the latent upscaled 2x and 3 steps at strength 0.6: a 128 px image
    "hires": ("a lighthouse at dusk", dict(sampler="euler", width=64, height=64,
                                           hires_fix="latent:scale=2,steps=3,strength=0.6"),
              ["--sampling-method", "euler", "--hires", "--hires-upscaler", "Latent", "--hires-scale", "2",
               "--hires-steps", "3", "--hires-denoising-strength", "0.6"]),
}



@pytest.fixture(scope="module")
def embd_dir(module_tmp):
    """A textual-inversion embedding of 3 vectors for SD1.5's 768-wide text encoder, under the name lumenstyle."""
    from safetensors.numpy import save_file

    folder = module_tmp / "embeddings"
    folder.mkdir()
    vectors = np.random.default_rng(21).standard_normal((3, 768)).astype(np.float32) * 0.4
    save_file({"emb_params": vectors}, str(folder / "lumenstyle.safetensors"))
    return folder


@pytest.fixture(scope="module")
def runs(sd15_f16, embd_dir):
    out = {}
    for backend in ("upstream", "accelerated"):
        with StableDiffusion(sd15_f16, backend=backend, threads=2, embeddings=embd_dir) as sd:
            for case, (prompt, opts, _) in CASES.items():
                out[backend, case] = sd.generate_with_info(prompt, **dict(SETTINGS, **opts))
        if backend == "upstream":   # the same prompt without the embedding: the word is just tokens
            with StableDiffusion(sd15_f16, backend=backend, threads=2) as sd:
                out[backend, "no-embedding"] = sd.generate_with_info(CASES["embedding"][0],
                                                                     **dict(SETTINGS, **CASES["embedding"][1]))
    return out


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES)
def test_upstream_is_sd_cli(runs, case, sd15_f16, embd_dir, tmp_path):
    prompt, opts, args = CASES[case]
    settings = dict(SETTINGS, prompt=prompt)
    cli = sd_cli_image(sd15_f16, settings, tmp_path, "--embd-dir", str(embd_dir), *args)
    np.testing.assert_array_equal(cli, np.asarray(runs["upstream", case].images[0]))


@pytest.mark.slow
def test_each_option_changes_the_image(runs):
    plain = runs["upstream", "plain"].images[0]
    for case in ("eta", "sigmas"):   # measured: eta 0.4 against euler_a's 1 gives 32.4 dB
        assert psnr(runs["upstream", case].images[0], plain) < 40, case
    assert psnr(runs["upstream", "embedding"].images[0], runs["upstream", "no-embedding"].images[0]) < 30
    assert runs["upstream", "sigmas"].params.num_inference_steps == 4
    assert runs["upstream", "hires"].images[0].size == (128, 128)   # 64 px, then 2x


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES)
def test_accelerated_within_its_txt2img_psnr(runs, case):
    assert_within_plain_psnr(case, runs["accelerated", case].images[0], runs["upstream", case].images[0],
                             runs["accelerated", "plain"].images[0], runs["upstream", "plain"].images[0])


@pytest.fixture(scope="module")
def header(sd15_f16):
    return read_model_file(sd15_f16)


def test_hires_specs(header, tmp_path):
    from pysdcpp.hires import HiresFix, parse_hires

    assert parse_hires("latent") == HiresFix("latent")
    assert parse_hires("lanczos:scale=1.5, steps=4 ,strength=0.5").spec() == "lanczos:scale=1.5,steps=4,strength=0.5"
    model = tmp_path / "esrgan.safetensors"
    model.write_bytes(b"x")
    assert parse_hires(f"{model}:width=1024,height=768").target(512, 512) == (1024, 768)
    for bad, message in [("bilinear", "one of"), ("latent:scale=9", "between 1 and 8"), ("latent:size=2", "options"),
                         ("latent:strength=0", "(0, 1]"), ("latent:steps=x", "not a number"),
                         ("latent:width=100", "multiples of 8")]:
        with pytest.raises(ValueError, match=re.escape(message)):
            parse_hires(bad)
    c = checked_generation(header, "upstream", "x", width=512, height=512, hires_fix="latent:scale=2")
    assert c.params.hires_fix == "latent" and "Hires fix: latent" in png_parameters(c.params, "m", "up", "0")
    with pytest.raises(ValueError, match="at most 4096"):
        checked_generation(header, "upstream", "x", width=1024, height=1024, hires_fix="latent:scale=8")


def test_png_records_eta_and_sigmas(header):
    p = checked_generation(header, "upstream", "x", eta=0.25, sigmas=[3, 1, 0]).params
    assert p.num_inference_steps == 2 and p.sigmas == (3.0, 1.0, 0.0)
    text = png_parameters(p, "m", "upstream", "0")
    assert "Eta: 0.25" in text and 'Sigmas: "3, 1, 0"' in text


@pytest.mark.parametrize("kwargs, message", [
    (dict(eta=-1.0), "eta"), (dict(eta=float("nan")), "eta"),
    (dict(sigmas=[1.0]), "at least two"), (dict(sigmas=[1.0, 2.0, 0.0]), "decreasing"),
    (dict(sigmas=[3.0, float("inf"), 0.0]), "finite"), (dict(sigmas="3,1,0"), "sequence"),
    (dict(sigmas=[3.0, 1.0, 0.0], num_inference_steps=5), "make 2 steps"),
])
def test_bad_options_fail_before_loading(header, kwargs, message):
    with pytest.raises((ValueError, TypeError), match=message):
        checked_generation(header, "upstream", "x", **kwargs)


def test_bad_embeddings(sd15_f16, tmp_path):
    with pytest.raises(ValueError, match="no such folder"):
        StableDiffusion(sd15_f16, embeddings=tmp_path / "nope")
    with pytest.raises(ValueError, match="no such file"):
        StableDiffusion(sd15_f16, embeddings={"style": tmp_path / "nope.safetensors"})
    with pytest.raises(ValueError, match="one word"):
        StableDiffusion(sd15_f16, embeddings={"two words": sd15_f16})
