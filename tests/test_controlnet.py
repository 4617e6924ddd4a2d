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
                num_inference_steps=2, guidance_scale=1.0, sampler="euler", seed=55)
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


# -- one UNet evaluation with ControlNet residuals, dense and ALTER-routed, against PyTorch ---------------------------
CONTROLNET_SEED = 11   # conftest's controlnet_sd15
_HINT_NAMES = {0: "conv_in", 2: "blocks.0", 4: "blocks.1", 6: "blocks.2", 8: "blocks.3", 10: "blocks.4",
               12: "blocks.5", 14: "conv_out"}


def _diffusers_sources() -> dict:
    """The fixture ControlNet in diffusers' ControlNetModel names: the cldm names mapped by hand here (the time
    embedding, input and middle blocks are the synthetic UNet's of the ControlNet's seed, in diffusers names)."""
    from pysdcpp.converters import synthetic

    values = {}
    for t in synthetic.synthetic_sources("sd1", CONTROLNET_SEED)["unet"]:
        if t.name.startswith(("time_embedding.", "conv_in.", "down_blocks.", "mid_block.")):
            values[t.name] = t
    for t in synthetic.controlnet_sources("sd1", CONTROLNET_SEED):
        name = t.name.removeprefix("control_model.")
        base, _, leaf = name.rpartition(".")
        if base.startswith("input_hint_block."):
            values[f"controlnet_cond_embedding.{_HINT_NAMES[int(base.split('.')[1])]}.{leaf}"] = t
        elif base.startswith("zero_convs."):
            values[f"controlnet_down_blocks.{base.split('.')[1]}.{leaf}"] = t
        elif base == "middle_block_out.0":
            values[f"controlnet_mid_block.{leaf}"] = t
    return values


def _torch_controlnet(unet):
    """diffusers' ControlNetModel for the fixture's UNet config with the ControlNet file's weights."""
    import torch
    from diffusers import ControlNetModel

    net = ControlNetModel.from_unet(unet, load_weights_from_unet=False)
    params = dict(net.named_parameters())
    values = _diffusers_sources()
    assert set(values) == set(params), sorted(set(params) ^ set(values))[:4]
    with torch.no_grad():
        for name, t in values.items():
            params[name].copy_(torch.from_numpy(t.load().astype(np.float32)))
    return net.eval()


@pytest.mark.slow
def test_unet_with_controlnet_residuals_dense_and_alter_routed_against_pytorch(sd15_f16, controlnet_sd15):
    """sd.unet(..., control_image=): the ControlNet runs on the evaluation's inputs and its residuals (times the
    weight) go into the skip connections and the middle block. Dense: against diffusers' UNet fed diffusers'
    ControlNet's residuals. ALTER-routed (every expert): against tests/alter_reference.py, whose k-th residual
    joins the k-th skip entry whichever ResNet pops it, as the runtime binds them."""
    import torch
    from alter_reference import alter_unet_forward
    from conftest import rel_l2, torch_reference
    from test_alter_runtime import TIMESTEPS, _expert_masks, _expert_of, mask_file

    rng = np.random.default_rng(21)
    latent = rng.standard_normal((1, 4, 8, 8)).astype(np.float32)   # 64 px: every level of the UNet (8, 4, 2, 1)
    context = rng.standard_normal((1, 77, 768)).astype(np.float32)
    hint = (rng.random((1, 3, 64, 64)) > 0.9).astype(np.float32)   # sparse "edges"
    scale = 0.8
    _, rows = _expert_masks("sd1")
    masks = mask_file("sd1", "fixture", rows)
    times = [TIMESTEPS[0], TIMESTEPS[2], TIMESTEPS[4]]   # experts 0, 1, 2
    with StableDiffusion(sd15_f16, threads=2, control_net=controlnet_sd15) as sd:
        dense = sd.unet(latent, times[0], context, control_image=hint, controlnet_conditioning_scale=scale)
        with pytest.raises(ValueError, match="shape"):
            sd.unet(latent, times[0], context, control_image=hint[:, :, :32])
    with StableDiffusion(sd15_f16, threads=2, control_net=controlnet_sd15, alter_masks=masks) as sd:
        routed = {t: sd.unet(latent, t, context, control_image=hint, controlnet_conditioning_scale=scale)
                  for t in times}
    unet = torch_reference("sd1", "unet")
    net = _torch_controlnet(unet)
    x, c, h = torch.from_numpy(latent), torch.from_numpy(context), torch.from_numpy(hint)
    with torch.no_grad():
        def residuals(t):
            down, mid = net(x, torch.tensor([t]), encoder_hidden_states=c, controlnet_cond=h,
                            conditioning_scale=scale, return_dict=False)
            return list(down), mid

        down, mid = residuals(times[0])
        ref = unet(x, torch.tensor([times[0]]), encoder_hidden_states=c, down_block_additional_residuals=down,
                   mid_block_additional_residual=mid).sample.numpy()
        plain = unet(x, torch.tensor([times[0]]), encoder_hidden_states=c).sample.numpy()
        n_units = len(rows[0])
        own = alter_unet_forward(unet, x, torch.tensor([times[0]]), c, [True] * n_units, control=(down, mid))
        assert rel_l2(own.numpy(), ref) < 1e-5   # the reference's residual path is diffusers'
        dense_err = rel_l2(dense, ref)
        print(f"dense UNet + ControlNet: rel. L2 {dense_err:.2e} against diffusers")
        assert dense_err <= 3e-3 and rel_l2(plain, ref) > 20 * dense_err   # the residuals count
        for t in times:
            keep = [bool(k) for k in rows[_expert_of(t)]]
            control = residuals(t)
            want = alter_unet_forward(unet, x, torch.tensor([t]), c, keep, "reference", control=control).numpy()
            err = rel_l2(routed[t], want)
            print(f"t={t}: ALTER expert {_expert_of(t)} + ControlNet rel. L2 {err:.2e} against the reference")
            assert err <= max(3e-3, 1.25 * dense_err), (t, err)
            unrouted = alter_unet_forward(unet, x, torch.tensor([t]), c, [True] * n_units, control=control)
            assert rel_l2(want, unrouted.numpy()) > 20 * err   # the routing counts


@pytest.mark.slow
def test_a_diffusers_controlnet_converts_to_the_cldm_fixture(controlnet_sd15, tmp_path):
    """`pysdcpp convert` of the fixture in diffusers' names (exactly ControlNetModel's parameters) writes the
    fixture's cldm names and bytes back, every tensor; the CLI refuses an existing output and keeps it."""
    import torch
    from click.testing import CliRunner
    from diffusers import ControlNetModel
    from safetensors.numpy import load_file, save_file

    from pysdcpp.cli import main
    from pysdcpp.format.families import UNET_CONFIGS

    sources = _diffusers_sources()
    with torch.device("meta"):
        names = set(ControlNetModel.from_config(UNET_CONFIGS["sd1"]).state_dict())
    assert set(sources) == names, sorted(set(sources) ^ names)[:4]
    folder = tmp_path / "sd-controlnet"
    folder.mkdir()
    save_file({n: t.load() for n, t in sources.items()}, str(folder / "diffusion_pytorch_model.safetensors"))
    out = tmp_path / "converted.safetensors"
    res = CliRunner().invoke(main, ["convert", str(folder), "-o", str(out)])
    assert res.exit_code == 0, res.output
    assert "sd1 ControlNet" in res.output
    converted, fixture = load_file(str(out)), load_file(str(controlnet_sd15))
    assert set(converted) == set(fixture), sorted(set(converted) ^ set(fixture))[:4]
    for name, value in fixture.items():
        assert converted[name].dtype == value.dtype and np.array_equal(converted[name], value), name
    before = out.read_bytes()[:4096]
    res = CliRunner().invoke(main, ["convert", str(folder), "-o", str(out)])
    assert res.exit_code != 0 and "exists" in res.output and out.read_bytes()[:4096] == before


def test_controlnet_convert_refuses_what_it_cannot_map(tmp_path):
    from safetensors.numpy import save_file

    from pysdcpp.converters.controlnet import cldm_name, convert_controlnet, weights_file
    from pysdcpp.converters.sd_layout import unet_name_map
    from pysdcpp.format.errors import FormatError
    from pysdcpp.format.families import UNET_CONFIGS

    names = unet_name_map(UNET_CONFIGS["sd1"])
    assert cldm_name("controlnet_cond_embedding.blocks.5.bias", names) == "control_model.input_hint_block.12.bias"
    assert cldm_name("down_blocks.3.resnets.1.conv2.weight", names) == \
        "control_model.input_blocks.11.0.out_layers.3.weight"
    for bad in ("controlnet_cond_embedding.blocks.6.weight", "controlnet_down_blocks.x.weight", "up_blocks.0.x"):
        with pytest.raises(FormatError, match="unexpected"):
            cldm_name(bad, names)
    plain = tmp_path / "plain.safetensors"
    save_file({"x.weight": np.zeros((2, 2), np.float16)}, str(plain))
    assert weights_file(plain) is None and weights_file(tmp_path) is None
    with pytest.raises(FormatError, match="not a diffusers ControlNet"):
        convert_controlnet(plain, tmp_path / "out.safetensors")
    odd = tmp_path / "odd.safetensors"
    save_file({"controlnet_cond_embedding.conv_in.weight": np.zeros((16, 3, 3, 3), np.float16),
               "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight": np.zeros((4, 512), np.float16)},
              str(odd))
    with pytest.raises(FormatError, match="512 wide"):
        convert_controlnet(odd, tmp_path / "out.safetensors")
    assert not (tmp_path / "out.safetensors").exists()
