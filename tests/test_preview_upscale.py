"""What a generation shows while it runs and does after it: latent previews (`preview=`, proj / vae / tae, the
interval, TAESD for previews only) and the context's ESRGAN upscaler (`upscaler=`), each against sd-cli's
--preview/--preview-path and --upscale-model on the upstream library, bit for bit; the last denoised preview
against the image itself; a preview callback's exception stopping the accelerated run; and `pysdcpp generate
--prompts-file` writing one image per prompt, each the one its own generate() call makes."""

from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import sd_cli_image
from PIL import Image

from pysdcpp import StableDiffusion, StopGeneration
from pysdcpp.cli import main
from pysdcpp.converters import synthetic
from pysdcpp.upscaler import Upscaler

pytestmark = pytest.mark.slow
SIZE = 64
STEPS = 3
SETTINGS = dict(prompt="a lighthouse at dusk", negative_prompt="", num_inference_steps=STEPS, guidance_scale=1.0,
                sampler="euler", seed=11, width=SIZE, height=SIZE)


@pytest.fixture(scope="module")
def files(module_tmp):
    return {"esrgan": synthetic.write_esrgan(module_tmp / "esrgan-x2.safetensors", seed=5, num_block=2, scale=2),
            "taesd": synthetic.write_tiny_autoencoder(module_tmp / "taesd.safetensors", seed=3)}


def _collect(out: list):
    return lambda step, image: out.append((step, image.copy()))


@pytest.fixture(scope="module")
def runs(sd15_f16, files):
    out = {}
    with StableDiffusion(sd15_f16, backend="upstream", threads=2) as sd:
        for mode in ("proj", "vae"):
            seen = []
            out[mode] = sd.generate_with_info(**SETTINGS, preview=_collect(seen), preview_mode=mode)
            out[mode].previews = seen
        seen = []
        out["interval"] = sd.generate_with_info(**SETTINGS, preview=_collect(seen), preview_interval=2)
        out["interval"].previews = seen
    with StableDiffusion(sd15_f16, backend="upstream", threads=2, taesd=files["taesd"],
                         taesd_preview_only=True) as sd:
        seen = []
        out["tae"] = sd.generate_with_info(**SETTINGS, preview=_collect(seen), preview_mode="tae")
        out["tae"].previews = seen
    with StableDiffusion(sd15_f16, backend="upstream", threads=2, upscaler=files["esrgan"]) as sd:
        out["upscaled"] = sd.generate_with_info(**SETTINGS)
    return out


def test_previews_come_at_each_step_at_the_mode_s_size(runs):
    assert [s for s, _ in runs["proj"].previews] == [1, 2, 3]
    assert {im.size for _, im in runs["proj"].previews} == {(SIZE // 8, SIZE // 8)}   # the latent's size
    assert {im.size for _, im in runs["vae"].previews} == {(SIZE, SIZE)}
    assert {im.size for _, im in runs["tae"].previews} == {(SIZE, SIZE)}
    assert [s for s, _ in runs["interval"].previews] == [2, 3]   # every 2nd step and the last
    # previews change nothing: every image is the plain one (the TAE decodes the previews only)
    for name in ("vae", "interval", "tae"):
        np.testing.assert_array_equal(np.asarray(runs[name].images[0]), np.asarray(runs["proj"].images[0]))


def test_the_last_denoised_preview_is_the_image(runs):
    """Euler's last step goes to sigma 0, where the next latent is the denoised estimate (up to float rounding):
    its VAE preview and the image decode the same latent."""
    last = np.asarray(runs["vae"].previews[-1][1], np.int16)
    image = np.asarray(runs["vae"].images[0], np.int16)
    diff = np.abs(last - image)
    assert diff.max() <= 2 and diff.mean() < 0.05, (diff.max(), diff.mean())
    # the TAE preview is another decoder: near the image only in the loosest sense, and not equal to it
    assert np.abs(np.asarray(runs["tae"].previews[-1][1], np.int16) - image).mean() > 1


@pytest.mark.parametrize("mode", ["proj", "vae", "tae"])
def test_previews_are_sd_cli_s(runs, mode, sd15_f16, files, tmp_path):
    preview = tmp_path / "preview.png"
    extra = ["--preview", mode, "--preview-path", str(preview)]
    if mode == "tae":
        extra += ["--taesd", str(files["taesd"]), "--taesd-preview-only"]
    cli = sd_cli_image(sd15_f16, SETTINGS, tmp_path, *extra)
    np.testing.assert_array_equal(cli, np.asarray(runs[mode].images[0]))
    np.testing.assert_array_equal(np.asarray(Image.open(preview).convert("RGB")), np.asarray(runs[mode].previews[-1][1]))


def test_the_upscaler_runs_after_the_generation(runs, sd15_f16, files, tmp_path):
    up = runs["upscaled"]
    assert up.images[0].size == (2 * SIZE, 2 * SIZE) and up.upscaled == ("esrgan-x2", 2, 1)
    with Upscaler(files["esrgan"], backend="upstream", threads=2) as u:
        np.testing.assert_array_equal(np.asarray(up.images[0]), np.asarray(u.upscale(runs["proj"].images[0])))
    cli = sd_cli_image(sd15_f16, SETTINGS, tmp_path, "--upscale-model", str(files["esrgan"]))
    np.testing.assert_array_equal(cli, np.asarray(up.images[0]))


def test_a_preview_exception_stops_the_accelerated_run(sd15_f16):
    seen = []

    def stop_at_2(step, image):
        seen.append(step)
        if step == 2:
            raise StopGeneration()

    steps = []
    with StableDiffusion(sd15_f16, threads=2) as sd:
        with pytest.raises(StopGeneration):
            sd.generate(**SETTINGS, preview=stop_at_2, callback=lambda i, n, s: steps.append(i))
        assert seen == [1, 2] and max(steps) <= 2
        last = []
        plain = sd.generate(**SETTINGS, preview=_collect(last), preview_mode="vae")
        diff = np.abs(np.asarray(last[-1][1], np.int16) - np.asarray(plain[0], np.int16))
        assert diff.max() <= 2 and diff.mean() < 0.05


def test_preview_arguments_are_checked_first(sd15_f16):
    with StableDiffusion(sd15_f16, backend="upstream", threads=2) as sd:
        for kwargs, err in ((dict(preview=1), "function"), (dict(preview=print, preview_mode="x"), "preview_mode"),
                            (dict(preview=print, preview_mode="tae"), "taesd"),
                            (dict(preview=print, preview_interval=0), "preview_interval")):
            with pytest.raises((TypeError, ValueError), match=err):
                sd.generate("x", **kwargs)
    for kwargs, err in ((dict(taesd_preview_only=True), "taesd="), (dict(upscale_repeats=0), "upscale_repeats"),
                        (dict(upscaler=sd15_f16), "not an ESRGAN")):
        with pytest.raises(Exception, match=err):
            StableDiffusion(sd15_f16, backend="upstream", **kwargs)


def test_cli_prompts_file(sd15_f16, files, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# two prompts\na red fox\n\na blue bird\n")
    out = tmp_path / "img.png"
    args = ["generate", str(sd15_f16), "--prompts-file", str(prompts), "-W", str(SIZE), "-H", str(SIZE), "--steps",
            "2", "--sampler", "euler", "--seed", "5", "--backend", "upstream", "-t", "2", "-o", str(out),
            "--preview", "proj"]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    paths = [tmp_path / "img_1.png", tmp_path / "img_2.png"]
    assert sorted(tmp_path.glob("img*.png")) == sorted([*paths, tmp_path / "img.preview.png"])
    with StableDiffusion(sd15_f16, backend="upstream", threads=2) as sd:
        for i, (path, prompt) in enumerate(zip(paths, ["a red fox", "a blue bird"])):
            ref = sd.generate(prompt, width=SIZE, height=SIZE, num_inference_steps=2, sampler="euler", seed=5 + i)[0]
            np.testing.assert_array_equal(np.asarray(Image.open(path).convert("RGB")), np.asarray(ref))
            assert "Seed: %d" % (5 + i) in Image.open(path).text["parameters"]
    before = paths[0].stat().st_mtime_ns
    res = CliRunner().invoke(main, args)   # again, without --overwrite: refused before any load
    assert res.exit_code == 1 and "exists" in res.output and paths[0].stat().st_mtime_ns == before
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing\n\n")
    res = CliRunner().invoke(main, ["generate", str(sd15_f16), "--prompts-file", str(empty), "-o", str(out)])
    assert res.exit_code == 1 and "no prompt" in res.output
