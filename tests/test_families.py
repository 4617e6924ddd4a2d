"""Every UNet family and variant stable-diffusion.cpp builds, without the native library: our parameter lists
against diffusers' own modules built from the same configs, detection from configs and from tensors in both
namings, the layouts upstream cannot build refused with what was found, and the unit table per variant."""

from __future__ import annotations

import json

import pytest
import torch
from gguf import GGUFReader

from pysdcpp.converters import ConversionError, convert, synthetic
from pysdcpp.converters.sd_layout import detect
from pysdcpp.format import keys
from pysdcpp.format.checkpoint_io import TensorSource
from pysdcpp.format.detect import classify, config_from_diffusers_tensors, config_from_ldm_tensors
from pysdcpp.format.errors import FormatError
from pysdcpp.format.families import UPSTREAM_VERSIONS, VARIANT_CHANGES, variant_unet_config
from pysdcpp.format.macs import unet_macs
from pysdcpp.format.unet import prunable_units, unet_blocks

ALL = sorted(UPSTREAM_VERSIONS)


def _meta(params):
    return [TensorSource(n, s, "F32", lambda: None) for n, s in params]


@pytest.mark.parametrize("family,variant", ALL)
def test_parameters_equal_diffusers_module(family, variant):
    """diffusers' UNet2DConditionModel built from the variant's config has exactly our parameter names and shapes."""
    from diffusers import UNet2DConditionModel

    cfg = variant_unet_config(family, variant)
    with torch.device("meta"):
        module = UNet2DConditionModel.from_config(cfg)
    theirs = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    ours = dict(synthetic.unet_parameters(cfg))
    assert ours == theirs


# Published parameter counts of the UNets (millions): the model cards and papers of SD1.5, SD2.1, SDXL 1.0,
# SSD-1B, Segmind-Vega and BK-SDM-Tiny.
_PUBLISHED_M = {("sd1", "base"): 860, ("sd2", "base"): 866, ("sdxl", "base"): 2567, ("sdxl", "ssd-1b"): 1331,
                ("sdxl", "vega"): 745, ("sd1", "tiny"): 323}


@pytest.mark.parametrize("arch", sorted(_PUBLISHED_M))
def test_parameter_counts_match_the_published_ones(arch):
    n = sum(int(torch.tensor(s).prod()) for _, s in synthetic.unet_parameters(variant_unet_config(*arch)))
    assert abs(n / 1e6 - _PUBLISHED_M[arch]) < 1.0


@pytest.mark.parametrize("family,variant", ALL)
@pytest.mark.parametrize("reduced", [False, True])
def test_detection_from_config_and_both_namings(family, variant, reduced):
    cfg = synthetic.model_configs(family, reduced, variant)["unet"]
    assert (classify(cfg).family, classify(cfg).variant) == (family, variant)
    params = synthetic.component_parameters(family, reduced, variant)
    read_back = classify(config_from_diffusers_tensors(params["unet"]))
    assert (read_back.family, read_back.variant) == (family, variant)
    ldm = synthetic.map_components({k: _meta(v) for k, v in params.items()})
    info = detect(ldm)
    assert (info.family, info.variant, info.has_text_encoder, info.has_vae) == (family, variant, True, True)
    assert info.architecture.upstream_version == UPSTREAM_VERSIONS[(family, variant)]
    # read back from LDM names, the layout gives the same blocks as the original config
    back = config_from_ldm_tensors([(t.name, t.shape) for t in ldm])
    assert [(b.kind, b.ldm, b.depth, b.cin, b.cout) for b in unet_blocks(back)] == \
        [(b.kind, b.ldm, b.depth, b.cin, b.cout) for b in unet_blocks(cfg)]


def test_layouts_upstream_cannot_build_are_refused_with_what_was_found():
    base = variant_unet_config("sd1")
    bk_base = dict(base, layers_per_block=1)                    # BK-SDM-Base: one ResNet per level, mid block kept
    bk_small = dict(bk_base, mid_block_type=None)               # BK-SDM-Small: mid block removed too
    for cfg in (bk_base, bk_small):
        with pytest.raises(FormatError, match="BK-SDM") as e:
            classify(cfg)
        assert "4 levels" in str(e.value) and "1 ResNet(s) per level" in str(e.value)
    with pytest.raises(FormatError, match="cross-attention width 512"):
        classify(dict(base, cross_attention_dim=512))
    with pytest.raises(FormatError, match="cannot build this sdxl UNet.*4 levels"):
        classify(dict(variant_unet_config("sdxl"), block_out_channels=[320, 640, 1280, 1280],
                      down_block_types=["DownBlock2D"] + ["CrossAttnDownBlock2D"] * 3,
                      up_block_types=["CrossAttnUpBlock2D"] * 3 + ["UpBlock2D"], transformer_layers_per_block=1,
                      attention_head_dim=[5, 10, 20, 20]))
    with pytest.raises(FormatError, match="no 'pix2pix' variant of sd2"):
        variant_unet_config("sd2", "pix2pix")
    with pytest.raises(FormatError, match="cannot build"):   # an SD2 pix2pix UNet: upstream has no such version
        classify(dict(variant_unet_config("sd2"), in_channels=8))


def test_unit_tables_follow_the_layout():
    """ALTER's units per variant: every transformer block of every stack, every channel-preserving ResNet."""
    for family, variant in ALL:
        cfg = variant_unet_config(family, variant)
        blocks = unet_blocks(cfg)
        units = prunable_units(cfg)
        n_transformers = sum(b.depth for b in blocks if b.kind == "attention")
        n_resnets = sum(1 for b in blocks if b.kind == "resnet" and b.cin == b.cout)
        assert len(units) == n_transformers + n_resnets
        macs = unet_macs(cfg, 32, 32)
        assert 0 < sum(macs.unit_macs) < macs.dense
    sdxl = prunable_units("sdxl")
    assert sum(u.kind == "transformer" for u in sdxl) == 2 * 2 + 10 * 2 + 10 + 10 * 3 + 2 * 3
    assert any(u.name == "middle_block.1.transformer_blocks.9" for u in sdxl)


def test_sdxl_macs_against_a_hook_count():
    """Dense SDXL MACs at 256 px counted independently: torch forward hooks on diffusers' module (meta tensors
    carry shapes only) over every conv, linear and attention product."""
    from diffusers import UNet2DConditionModel

    cfg = variant_unet_config("sdxl")
    with torch.device("meta"):
        module = UNet2DConditionModel.from_config(cfg)
    total = 0

    def conv_hook(m, inp, out):
        nonlocal total
        total += out.numel() * m.in_channels // m.groups * m.kernel_size[0] * m.kernel_size[1]

    def linear_hook(m, inp, out):
        nonlocal total
        total += out.numel() * m.in_features

    def attn_hook(m, inp, out):
        nonlocal total
        x = inp[0]
        ctx = inp[1] if len(inp) > 1 and inp[1] is not None else x
        total += 2 * x.shape[0] * x.shape[1] * ctx.shape[1] * m.inner_dim

    from diffusers.models.attention_processor import Attention

    for mod in module.modules():
        if isinstance(mod, torch.nn.Conv2d):
            mod.register_forward_hook(conv_hook)
        elif isinstance(mod, torch.nn.Linear):
            mod.register_forward_hook(linear_hook)
        elif isinstance(mod, Attention):
            mod.register_forward_pre_hook(lambda m, a, kw: attn_hook(m, (a[0], kw.get("encoder_hidden_states")),
                                                                      None), with_kwargs=True)
    with torch.no_grad(), torch.device("meta"):
        module(torch.zeros(1, 4, 32, 32), torch.tensor([500.0]), torch.zeros(1, 77, 2048),
               added_cond_kwargs={"text_embeds": torch.zeros(1, 1280), "time_ids": torch.zeros(1, 6)})
    ours = unet_macs(cfg, 32, 32)
    # ours leaves out the time embedding's sinusoids and the added embedding's linears (constant, tiny)
    extra = 2816 * 1280 + 1280 * 1280
    assert ours.dense + extra == total


@pytest.mark.parametrize("family,variant", ALL)
def test_reduced_diffusers_folder_converts_with_its_variant(family, variant, tmp_path):
    folder = synthetic.write_diffusers_folder(tmp_path / "model", family, 0, reduced=True, variant=variant)
    out = tmp_path / "m.gguf"
    report = convert(folder, out, "f16")
    assert (report.family, report.variant) == (family, variant)
    from pysdcpp.modelfile import read_model_file

    mf = read_model_file(out)
    assert (mf.metadata[keys.FAMILY], mf.metadata[keys.VARIANT]) == (family, variant)
    assert (mf.architecture.family, mf.architecture.variant) == (family, variant)


def test_folder_whose_config_disagrees_with_its_weights_is_refused(tmp_path):
    folder = synthetic.write_diffusers_folder(tmp_path / "model", "sdxl", 0, reduced=True, variant="vega")
    cfg_path = folder / "unet" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    # SSD-1B's attention depths: a layout upstream builds, but not the one these weights have
    cfg_path.write_text(json.dumps(dict(cfg, **VARIANT_CHANGES["sdxl"]["ssd-1b"])))
    with pytest.raises(ConversionError, match="describes a sdxl-ssd-1b UNet, its weights hold a sdxl-vega one"):
        convert(folder, tmp_path / "m.gguf")
    cfg.pop("mid_block_type")   # diffusers' default: the full mid block, with these depths a layout upstream lacks
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ConversionError, match="unet/config.json: stable-diffusion.cpp cannot build this sdxl UNet"):
        convert(folder, tmp_path / "m.gguf")
    assert not (tmp_path / "m.gguf").exists()


def test_sdxl_folder_without_its_second_text_encoder_is_refused(tmp_path):
    import shutil

    folder = synthetic.write_diffusers_folder(tmp_path / "model", "sdxl", 0, reduced=True)
    shutil.rmtree(folder / "text_encoder_2")
    with pytest.raises(ConversionError, match="text_encoder and text_encoder_2"):
        convert(folder, tmp_path / "m.gguf")


def test_every_variant_is_in_the_table():
    assert {v for t in VARIANT_CHANGES.values() for v in t} == {
        "base", "inpaint", "pix2pix", "tiny", "sdxs", "ssd-1b", "vega"}


# ---- few-step models: defaults only where the source declares them ----------------------------------------------

def _scheduler(folder, **cfg):
    path = folder / "scheduler" / "scheduler_config.json"
    path.write_text(json.dumps(dict(json.loads(path.read_text()), **cfg)))


def test_few_step_from_the_scheduler_config_and_the_user(tmp_path):
    from pysdcpp.modelfile import read_model_file

    folder = synthetic.write_diffusers_folder(tmp_path / "model", "sdxl", 0, reduced=True)
    plain = convert(folder, tmp_path / "plain.gguf")
    assert plain.few_step is None and keys.FEW_STEP not in read_model_file(tmp_path / "plain.gguf").metadata
    _scheduler(folder, _class_name="EulerAncestralDiscreteScheduler", timestep_spacing="trailing")
    turbo = convert(folder, tmp_path / "turbo.gguf")
    meta = read_model_file(tmp_path / "turbo.gguf").metadata
    assert turbo.few_step == meta[keys.FEW_STEP] == "turbo"
    assert "scheduler_config.json" in meta[keys.FEW_STEP_SOURCE]
    assert convert(folder, tmp_path / "none.gguf", few_step="none").few_step is None
    _scheduler(folder, _class_name="LCMScheduler")
    assert convert(folder, tmp_path / "lcm.gguf").few_step == "lcm"
    _scheduler(folder, _class_name="EulerDiscreteScheduler", timestep_spacing="leading")
    forced = convert(folder, tmp_path / "forced.gguf", few_step="turbo")
    assert forced.few_step == "turbo"
    assert read_model_file(tmp_path / "forced.gguf").metadata[keys.FEW_STEP_SOURCE] == "the user (--few-step)"
    with pytest.raises(ConversionError, match="few_step must be"):
        convert(folder, tmp_path / "bad.gguf", few_step="fast")


def test_few_step_from_safetensors_modelspec_metadata_never_from_the_name(tmp_path):
    from safetensors.numpy import save_file

    from conftest import sdxl_single_file_state

    state = sdxl_single_file_state()
    turbo = tmp_path / "model.safetensors"
    save_file(state, str(turbo), metadata={"modelspec.title": "SDXL Turbo", "modelspec.architecture":
                                           "stable-diffusion-xl-v1-base"})
    assert convert(turbo, tmp_path / "a.gguf").few_step == "turbo"
    named = tmp_path / "sdxl-turbo-lcm.safetensors"   # a name says nothing
    save_file(state, str(named), metadata={"modelspec.title": "SDXL 1.0"})
    assert convert(named, tmp_path / "b.gguf").few_step is None


def test_generation_defaults_table():
    from pysdcpp.format.sampling import generation_defaults

    assert generation_defaults(None) == {"num_inference_steps": 20, "guidance_scale": 7.0, "sampler": "euler_a"}
    assert generation_defaults("turbo") == {"num_inference_steps": 1, "guidance_scale": 1.0, "sampler": "euler_a"}
    assert generation_defaults("lcm")["sampler"] == "lcm"


def test_sdxs_converts_with_its_tiny_autoencoder(tmp_path):
    """An SDXS folder ships diffusers' AutoencoderTiny: it becomes upstream's TAE (its names under tae.), and the
    file has no KL autoencoder tensors."""
    from pysdcpp.converters.sd_layout import map_tae
    from pysdcpp.format.names import TAE_PREFIX, VAE_PREFIX

    folder = synthetic.write_diffusers_folder(tmp_path / "model", "sd1", 0, reduced=True, variant="sdxs")
    report = convert(folder, tmp_path / "m.gguf")
    assert (report.family, report.variant) == ("sd1", "sdxs")
    names = {t.name for t in GGUFReader(str(tmp_path / "m.gguf")).tensors}
    tae = {n for n in names if n.startswith(TAE_PREFIX)}
    assert tae == {t.name for t in map_tae(synthetic.synthetic_sources("sd1", 0, True, "sdxs")["vae"])}
    assert len(tae) == 134 and not any(n.startswith(VAE_PREFIX) for n in names)


def test_a_tiny_autoencoder_goes_with_sdxs_only(tmp_path):
    """A TAE beside any other UNet, or a KL autoencoder beside an SDXS UNet, is refused: upstream decodes SDXS with
    a TAE and everything else with its KL autoencoder."""
    tiny = synthetic.write_diffusers_folder(tmp_path / "sdxs", "sd1", 0, reduced=True, variant="sdxs")
    kl = synthetic.write_diffusers_folder(tmp_path / "base", "sd1", 0, reduced=True)
    (tmp_path / "base" / "vae").rename(tmp_path / "kl-vae")
    (tmp_path / "sdxs" / "vae").rename(tmp_path / "base" / "vae")
    (tmp_path / "kl-vae").rename(tmp_path / "sdxs" / "vae")
    with pytest.raises(ConversionError, match="tiny autoencoder .*only for the SDXS"):
        convert(kl, tmp_path / "a.gguf")
    with pytest.raises(ConversionError, match="KL autoencoder with a .*sdxs"):
        convert(tiny, tmp_path / "b.gguf")
    assert not any(tmp_path.glob("*.gguf"))