"""End-to-end generation: upstream and accelerated libraries agree bit for bit (nothing is enabled in the
accelerated one yet), both agree with upstream's own sd-cli, PNGs carry their parameters, memory stays flat."""

from __future__ import annotations

import subprocess

import numpy as np
import pytest
from PIL import Image

from pysdcpp import StableDiffusion, _native
from pysdcpp.api import png_parameters, save_png

SETTINGS = dict(prompt="a lighthouse at dusk", negative_prompt="blurry", width=128, height=128,
                num_inference_steps=3, guidance_scale=7.0, sampler="euler_a", seed=1234)


@pytest.fixture(scope="module")
def images(sd15_f16):
    out = {}
    # The accelerated library with its accelerations off (im2col convs, upstream attention) must be upstream,
    # bit for bit.
    for backend in ("upstream", "accelerated"):
        with StableDiffusion(sd15_f16, backend=backend, threads=2, conv="im2col", attention="upstream",
                             linear="upstream", batch_guidance=False) as sd:
            out[backend] = sd.generate(**SETTINGS)
    return out


def test_backends_bit_identical(images):
    up, acc = images["upstream"], images["accelerated"]
    assert len(up) == len(acc) == 1
    assert up[0].size == (128, 128)
    a, b = np.asarray(up[0]), np.asarray(acc[0])
    assert a.std() > 0  # not a blank image
    np.testing.assert_array_equal(a, b)


@pytest.mark.slow
def test_same_as_upstream_cli(images, sd15_f16, tmp_path):
    cli = _native.upstream_cli()
    if cli is None:
        pytest.skip("upstream sd-cli was not built (PYSDCPP_BUILD_CLI=OFF)")
    out = tmp_path / "cli.png"
    cmd = [str(cli), "-m", str(sd15_f16), "-p", SETTINGS["prompt"], "-n", SETTINGS["negative_prompt"],
           "-W", "128", "-H", "128", "--steps", "3", "--cfg-scale", "7.0", "--sampling-method", "euler_a",
           "--seed", "1234", "-t", "2", "-o", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    np.testing.assert_array_equal(np.asarray(Image.open(out).convert("RGB")), np.asarray(images["upstream"][0]))


def test_png_parameters_roundtrip(images, tmp_path):
    from pysdcpp.api import GenerationParams

    p = GenerationParams(**SETTINGS)
    text = png_parameters(p, "sd15", "accelerated", "0.1.0")
    path = tmp_path / "x.png"
    save_png(images["accelerated"][0], path, text)
    got = Image.open(path).text["parameters"]
    lines = got.split("\n")
    assert lines[0] == SETTINGS["prompt"]
    assert lines[1] == "Negative prompt: blurry"
    fields = dict(kv.split(": ", 1) for kv in lines[2].split(", "))
    assert fields["Steps"] == "3" and fields["Sampler"] == "Euler a" and fields["Seed"] == "1234"
    assert fields["CFG scale"] == "7" and fields["Size"] == "128x128"


@pytest.mark.slow
def test_seed_changes_image_and_batch(sd15_f16):
    with StableDiffusion(sd15_f16, threads=2) as sd:
        a = sd.generate("x", width=64, height=64, num_inference_steps=1, seed=1)[0]
        b = sd.generate("x", width=64, height=64, num_inference_steps=1, seed=2)[0]
        batch = sd.generate("x", width=64, height=64, num_inference_steps=1, seed=1, batch_size=2)
    assert not np.array_equal(np.asarray(a), np.asarray(b))
    assert len(batch) == 2
    np.testing.assert_array_equal(np.asarray(batch[0]), np.asarray(a))



def test_few_step_file_gets_its_defaults_and_a_plain_one_does_not(sd15_f16):
    """A file recording a turbo model samples 1 step without guidance unless told otherwise; a plain one keeps 20
    steps and guidance 7 (checked on the parameters the generation ran with)."""
    from pysdcpp.format import keys

    with StableDiffusion(sd15_f16, threads=2) as sd:
        plain = sd.generate_with_info("x", width=64, height=64, num_inference_steps=1)
        assert (plain.params.guidance_scale, plain.params.sampler) == (7.0, "euler_a")
        sd.model_file.metadata[keys.FEW_STEP] = "turbo"
        turbo = sd.generate_with_info("x", width=64, height=64)
        assert (turbo.params.num_inference_steps, turbo.params.guidance_scale) == (1, 1.0)
        assert len(turbo.step_seconds) >= 1
        told = sd.generate_with_info("x", width=64, height=64, num_inference_steps=2, guidance_scale=3.0)
        assert (told.params.num_inference_steps, told.params.guidance_scale) == (2, 3.0)
