"""The `pysdcpp` command: the README's demo, convert, inspect, info, and clear errors (exit code 1, no traceback)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from pysdcpp.cli import main


@pytest.fixture()
def runner():
    return CliRunner()


def test_generate_demo(runner, tmp_path, monkeypatch, cache_root):
    monkeypatch.setenv("PYSDCPP_CACHE_DIR", str(cache_root))  # the demo model is the SD1.5 fixture
    out = tmp_path / "demo.png"
    res = runner.invoke(main, ["generate", "--demo", "--steps", "2", "-W", "128", "-H", "128", "-t", "2",
                               "-o", str(out), "--json"])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout[res.stdout.index("{"):])
    assert summary["images"] == [str(out)]
    assert (summary["conv"], summary["attention"], summary["linear"]) == ("winograd", "fast", "fast")  # defaults
    img = Image.open(out)
    assert img.size == (128, 128)
    assert "Steps: 2" in img.text["parameters"]
    assert np.asarray(img).std() > 0
    assert "Random weights draw noise" in res.stderr


def test_generate_errors(runner, tmp_path, sd15_f16):
    out = ["-o", str(tmp_path / "o.png")]
    res = runner.invoke(main, ["generate", str(tmp_path / "missing.gguf"), "-p", "x", *out])
    assert res.exit_code == 1 and "no such file" in res.output
    res = runner.invoke(main, ["generate", str(sd15_f16), "-p", "x", "-W", "100", *out])
    assert res.exit_code == 1 and "multiple of 8" in res.output
    res = runner.invoke(main, ["generate", str(sd15_f16), "-p", "x", "--steps", "0", *out])
    assert res.exit_code == 1 and "at least 1" in res.output
    res = runner.invoke(main, ["generate", str(sd15_f16), "-p", "x", "--step-cache", "ucache:thresh=1", *out])
    assert res.exit_code == 1 and "unknown ucache option 'thresh'" in res.output
    res = runner.invoke(main, ["generate", str(sd15_f16), "-p", "x", "--step-cache", "ucache", "--inherit",
                               "deepcache", *out])
    assert res.exit_code == 1 and "use one" in res.output
    res = runner.invoke(main, ["generate", *out])
    assert res.exit_code == 1 and "--demo" in res.output
    # the generation surface's options, each refused before the model loads
    img = tmp_path / "in.png"
    from PIL import Image

    Image.new("RGB", (64, 64)).save(img)
    for args, message in [(["-i", str(img), "--strength", "1.5"], "strength"),
                          (["--mask", str(img)], "needs an image"),
                          (["-i", str(tmp_path / "nope.png")], "no such file"),
                          (["--lora", str(tmp_path / "nope.safetensors")], "no such file"),
                          (["-p", "x <lora:nope:1>", "--lora-dir", str(tmp_path)], "no LoRA file"),
                          (["--lora-dir", str(tmp_path / "nope")], "no such folder"),
                          (["--vae-tile-size", "2x2"], "4..512"),
                          (["--vae-tile-overlap", "0.3"], "needs vae_tiling"),
                          (["--taesd", str(sd15_f16)], "not a tiny autoencoder")]:
        res = runner.invoke(main, ["generate", str(sd15_f16), "-p", "x", *args, *out])
        assert res.exit_code == 1 and message in res.output, (args, res.output)
    res = runner.invoke(main, ["upscale", str(img), "-m", str(sd15_f16), "-o", str(tmp_path / "u.png")])
    assert res.exit_code == 1 and "not an ESRGAN" in res.output, res.output
    assert not (tmp_path / "o.png").exists() and not (tmp_path / "u.png").exists()
    assert "Traceback" not in res.output


def test_inspect_json(runner, sd15_f16):
    res = runner.invoke(main, ["inspect", str(sd15_f16), "--json"])
    assert res.exit_code == 0, res.output
    info = json.loads(res.stdout)
    assert info["format"] == "gguf" and info["family"] == "sd1" and info["prediction"] == "eps"
    # Tensor count against diffusers' / transformers' own modules of the SD1.5 configs (built on the meta device).
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from pysdcpp.format.families import TEXT_CONFIGS, UNET_CONFIGS, VAE_CONFIG

    with torch.device("meta"):
        modules = [UNet2DConditionModel.from_config(UNET_CONFIGS["sd1"]), AutoencoderKL.from_config(VAE_CONFIG),
                   CLIPTextModel(CLIPTextConfig(**TEXT_CONFIGS["sd1"]))]
    expected = sum(1 for m in modules for k in m.state_dict() if not k.endswith("position_ids"))
    assert info["n_tensors"] == expected
    assert set(info["components"]) == {"unet", "vae", "text_encoder"}
    assert set(info["types"]) == {"F16"}   # an F16 checkpoint converted to f16 keeps every tensor F16


def test_info_json(runner):
    res = runner.invoke(main, ["info", "--json"])
    assert res.exit_code == 0, res.output
    info = json.loads(res.stdout)
    for backend in ("upstream", "accelerated"):
        b = info["backends"][backend]
        assert b["available"], b
        assert "euler_a" in b["samplers"]
    assert info["backends"]["accelerated"]["components"] is True
    assert info["backends"]["upstream"]["components"] is False
    assert info["build"]["ggml_llamafile"] in ("ON", "1", "TRUE", "True", "on")


def test_convert_cli_errors(runner, tmp_path):
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a model")
    res = runner.invoke(main, ["convert", str(junk), "-o", str(tmp_path / "o.gguf")])
    assert res.exit_code == 1 and "not a safetensors file" in res.output
    assert not (tmp_path / "o.gguf").exists()
