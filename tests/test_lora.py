"""LoRAs (`loras=`, the prompt's <lora:name:w> tags): on the upstream library the image sd-cli makes with
--lora-model-dir and the same tags, bit for bit, for kohya (LoCon convs included) and diffusers/PEFT files at two
weights, every LoRA tensor applied; on the accelerated library within the PSNR its plain txt2img shows. In one
context, generate / apply / remove: the LoRA image equals a fresh context's on every conv path, also after
component calls that cached Winograd filters of the old weights; removing it restores the image exactly at
runtime and within a stated PSNR when the LoRA was added into the F16 weights."""

from __future__ import annotations

import re

import numpy as np
import pytest
from conftest import assert_within_plain_psnr, psnr, sd_cli_image

from pysdcpp import StableDiffusion
from pysdcpp.api import checked_generation, png_parameters
from pysdcpp.converters import synthetic
from pysdcpp.lora import prompt_loras
from pysdcpp.modelfile import read_model_file

SETTINGS = dict(negative_prompt="blurry", width=64, height=64, num_inference_steps=2, guidance_scale=1.0,
                sampler="euler", seed=31)   # small: the LoRA applies the same at any size
PROMPT = "a lighthouse at dusk"
# name: prompt tags (sd-cli reads the same); the files are in the fixture's LoRA folder
CASES = {"kohya-0.8": "<lora:style:0.8>", "peft-1": "<lora:detail:1>",
         "both": "<lora:style:0.5> <lora:detail.safetensors:-0.7>"}
ACCELERATED_CASES = ("both",)
_APPLIED = re.compile(r"\((\d+) / (\d+)\) LoRA tensors have been applied")



# Every kind of layer the fixture LoRAs adapt (attention projections, feed-forward, proj_in/out, ResNet convs, the
# text encoder's projections and MLP) in a few blocks: the 320-channel outer levels, the middle block, two text
# layers. Applying a LoRA of all of them takes upstream about 9 s per generation (it merges the LoRA into the F16
# weights anew each time, even an unchanged one); these take a fraction, and exercise the same name mappings.
_SUBSET = re.compile(r"(down_blocks[._]0[._]|up_blocks[._]3[._]|mid_block[._]|layers[._](0|11)[._])")


def _subset(path):
    from safetensors.numpy import load_file, save_file

    tensors = load_file(str(path))
    save_file({k: v for k, v in tensors.items() if _SUBSET.search(k)}, str(path))
    return path


@pytest.fixture(scope="module")
def lora_dir(module_tmp):
    folder = module_tmp / "loras"
    folder.mkdir()
    _subset(synthetic.write_lora(folder / "style.safetensors", fmt="kohya", rank=4, seed=1, alpha=2.0))
    # diffusers/PEFT names: the UNet's only (upstream leaves out text_encoder.* names: test_peft_text_encoder...)
    _subset(synthetic.write_lora(folder / "detail.safetensors", fmt="peft", rank=8, seed=2, text_encoder=False))
    return folder


@pytest.fixture(scope="module")
def runs(sd15_f16, lora_dir):
    out = {}
    for backend in ("upstream", "accelerated"):
        # a context per case, as sd-cli has: removing an immediately applied LoRA is not exact (F16 weights). The
        # accelerated library draws the case with both formats at two weights (the name mappings are upstream's,
        # checked against sd-cli case by case).
        for case, tags in {"none": "", **CASES}.items():
            if backend == "accelerated" and case not in ("none", *ACCELERATED_CASES):
                continue
            with StableDiffusion(sd15_f16, backend=backend, threads=2, lora_dir=lora_dir) as sd:
                with sd.native.capture() as log:
                    out[backend, case] = sd.generate_with_info(f"{PROMPT} {tags}" if tags else PROMPT, **SETTINGS)
                out[backend, case].log = list(log)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES)
def test_upstream_is_sd_cli_and_every_tensor_applies(runs, case, sd15_f16, lora_dir, tmp_path):
    cli = sd_cli_image(sd15_f16, dict(SETTINGS, prompt=f"{PROMPT} {CASES[case]}"), tmp_path,
                       "--lora-model-dir", str(lora_dir))
    ours = runs["upstream", case]
    np.testing.assert_array_equal(cli, np.asarray(ours.images[0]))
    applied = _APPLIED.findall("\n".join(ours.log))
    assert applied and all(a == b for a, b in applied), applied   # no LoRA tensor left unmatched
    assert psnr(ours.images[0], runs["upstream", "none"].images[0]) < 30   # the LoRA changed the image


@pytest.mark.slow
@pytest.mark.parametrize("case", ACCELERATED_CASES)
def test_accelerated_within_its_txt2img_psnr(runs, case):
    assert_within_plain_psnr(case, runs["accelerated", case].images[0], runs["upstream", case].images[0],
                             runs["accelerated", "none"].images[0], runs["upstream", "none"].images[0])


@pytest.fixture(scope="module")
def latent_inputs(sd15_f16):
    rng = np.random.default_rng(4)
    return rng.standard_normal((1, 4, 8, 8)).astype(np.float32), rng.standard_normal((1, 77, 768)).astype(
        np.float32)


@pytest.mark.slow
@pytest.mark.parametrize("conv, mode", [("winograd", "immediately"), ("im2col", "immediately"),
                                        ("direct", "immediately"), ("winograd", "at_runtime")])
def test_apply_and_remove_in_one_context(sd15_f16, lora_dir, latent_inputs, conv, mode):
    style = [(lora_dir / "style.safetensors", 0.8)]
    x, ctx = latent_inputs
    with StableDiffusion(sd15_f16, threads=2, conv=conv, lora_apply_mode=mode) as fresh:
        wanted = np.asarray(fresh.generate(PROMPT, loras=style, **SETTINGS)[0])
        wanted_unet = fresh.unet(x, 500, ctx)
    with StableDiffusion(sd15_f16, threads=2, conv=conv, lora_apply_mode=mode) as sd:
        sd.unet(x, 500, ctx)   # component calls cache Winograd filters of the weights without the LoRA
        first = np.asarray(sd.generate(PROMPT, **SETTINGS)[0])
        sd.unet(x, 500, ctx)
        with_lora = np.asarray(sd.generate(PROMPT, loras=style, **SETTINGS)[0])
        unet_lora = sd.unet(x, 500, ctx)
        third = np.asarray(sd.generate(PROMPT, **SETTINGS)[0])
    np.testing.assert_array_equal(with_lora, wanted)
    assert psnr(with_lora, first) < 30
    if mode == "immediately":
        # the weights hold the LoRA now: component calls see it too, as in a fresh context
        np.testing.assert_array_equal(unet_lora, wanted_unet)
        removed = psnr(first, third)
        print(f"{conv}: removing an immediately applied LoRA (F16 weights): {removed:.1f} dB against the image "
              "before it")
        assert removed > 30
    else:
        np.testing.assert_array_equal(first, third)   # computed beside the layers: removing it is exact


@pytest.fixture(scope="module")
def header(sd15_f16):
    return read_model_file(sd15_f16)


@pytest.mark.slow
def test_png_records_explicit_loras(header, lora_dir):
    c = checked_generation(header, "upstream", f"{PROMPT} <lora:style:0.5>",
                           loras={lora_dir / "detail.safetensors": 0.25}, lora_dir=lora_dir)
    assert [w for _, w in c.loras] == [0.25, 0.5]   # sorted by path: detail, style
    assert c.library_prompt == f"{PROMPT} "
    text = png_parameters(c.params, "m", "upstream", "0")
    assert "<lora:style:0.5>" in text and "LoRAs: detail:0.25" in text


def test_peft_text_encoder_tensors_are_named_in_a_warning(tmp_path, caplog):
    from pysdcpp.lora import check_lora_file

    path = synthetic.write_lora(tmp_path / "both.safetensors", fmt="peft", rank=2)
    with caplog.at_level("WARNING", logger="pysdcpp.lora"):
        check_lora_file(path)
    assert "leaves out its 144 text-encoder tensors" in caplog.text


@pytest.mark.slow
def test_convert_makes_peft_text_encoder_tensors_apply(sd15_f16, tmp_path):
    """`pysdcpp convert` of a PEFT LoRA with text-encoder tensors: kohya's names for exactly the tensors the kohya
    writer gives the same matrices (the fixture's two formats hold equal weights at alpha = rank), and the image
    the kohya file makes, bit for bit, with every tensor applied (the PEFT file's text-encoder part applies none)."""
    from click.testing import CliRunner
    from safetensors.numpy import load_file

    from pysdcpp.cli import main

    peft = synthetic.write_lora(tmp_path / "peft.safetensors", fmt="peft", rank=2, seed=7)
    kohya = _subset(synthetic.write_lora(tmp_path / "kohya.safetensors", fmt="kohya", rank=2, seed=7))
    _subset(peft)
    out = tmp_path / "converted.safetensors"
    res = CliRunner().invoke(main, ["convert", str(peft), "-o", str(out)])
    n_text = sum(k.startswith("text_encoder.") for k in load_file(str(peft)))   # two layers' 6 projections
    assert res.exit_code == 0 and f"{n_text} text-encoder tensors renamed" in res.output, res.output
    got, want = load_file(str(out)), load_file(str(kohya))
    te = {k: v for k, v in got.items() if k.startswith("lora_te_")}
    assert set(te) == {k for k in want if k.startswith("lora_te_") and not k.endswith(".alpha")}
    for k, v in te.items():
        np.testing.assert_array_equal(v, want[k])
    unet_names = {k for k in load_file(str(peft)) if k.startswith("unet.")}
    assert {k for k in got if not k.startswith("lora_te_")} == unet_names   # the UNet's kept as they are
    res = CliRunner().invoke(main, ["convert", str(peft), "-o", str(out)])
    assert res.exit_code == 1 and "exists" in res.output
    images, logs = {}, {}
    with StableDiffusion(sd15_f16, backend="upstream", threads=2, lora_apply_mode="at_runtime") as sd:
        for name, path in (("converted", out), ("kohya", kohya), ("peft", peft)):
            with sd.native.capture() as log:
                images[name] = np.asarray(sd.generate(PROMPT, loras={path: 1.0}, **SETTINGS)[0])
            logs[name] = _APPLIED.findall("\n".join(log))
    np.testing.assert_array_equal(images["converted"], images["kohya"])
    assert logs["converted"] and all(a == b for a, b in logs["converted"]), logs["converted"]
    assert not np.array_equal(images["converted"], images["peft"])   # the text encoder's LoRA now counts


def test_prompt_tags_as_sd_cli_reads_them(lora_dir):
    text, found = prompt_loras("a <lora:style:0.5>cat <lora:style:.25x> <lora:detail.safetensors:-1e-1>", lora_dir)
    assert text == "a cat  "
    assert found == {str(lora_dir / "style.safetensors"): 0.75, str(lora_dir / "detail.safetensors"): -0.1}
    assert prompt_loras("no tags", lora_dir) == ("no tags", {})


@pytest.mark.parametrize("kwargs, message", [
    (dict(prompt="x <lora:missing:1>"), "no LoRA file"),
    (dict(prompt="x <lora:style:heavy>"), "not a number"),
    (dict(loras=[("/nonexistent.safetensors", 1.0)]), "no such file"),
    (dict(loras=[("STYLE", float("nan"))]), "finite"),
    (dict(loras=[("STYLE", 1.0, 2)]), "pair"),
    (dict(loras=["MODEL"]), "no LoRA tensors"),
])
def test_bad_loras_fail_before_loading(lora_dir, sd15_f16, header, kwargs, message):
    kwargs = dict(kwargs)
    if "loras" in kwargs:
        kwargs["loras"] = [tuple(str(lora_dir / "style.safetensors") if v == "STYLE" else str(sd15_f16)
                                 if v == "MODEL" else v for v in item) if isinstance(item, tuple) else
                           (str(sd15_f16) if item == "MODEL" else item) for item in kwargs["loras"]]
    prompt = kwargs.pop("prompt", "x")
    with pytest.raises((ValueError, TypeError), match=message):
        checked_generation(header, "upstream", prompt, lora_dir=lora_dir, **kwargs)


def test_bad_context_options(sd15_f16, tmp_path):
    with pytest.raises(ValueError, match="lora_apply_mode"):
        StableDiffusion(sd15_f16, lora_apply_mode="sometimes")
    with pytest.raises(ValueError, match="no such folder"):
        StableDiffusion(sd15_f16, lora_dir=tmp_path / "nope")
