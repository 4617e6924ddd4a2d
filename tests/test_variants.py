"""The UNet variants stable-diffusion.cpp builds, at full size in the native library: each converted from a diffusers
folder (SD1.x/SD2.x) or written from the synthetic weights (the distilled SDXL UNets), loaded, detected as its
upstream version, and one UNet evaluation against diffusers' original with the same F16 weights (the SDXS ones,
which decode with a tiny autoencoder, one decode too). The files live in the test's temporary folder and go
with it."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from conftest import FIXTURE_SEED, reference_arrays, rel_l2
from pysdcpp import StableDiffusion
from pysdcpp.converters import convert, gguf_out, synthetic
from pysdcpp.format import keys
from pysdcpp.format.families import TINY_VAE_VARIANTS, UPSTREAM_VERSIONS, context_width, y_width
from pysdcpp.modelfile import read_model_file

pytestmark = pytest.mark.slow
UNET_TOL = 2e-3   # test_components' bound for the SD1.x UNet
LATENT = 16

# SD1.x/SD2.x variants go the user's way (diffusers folder -> pysdcpp convert). The SDXL ones are written straight
# from the synthetic weights with their text encoders quantized to q4_0 (the UNet evaluation takes its context as
# input): a full-size SDXL folder beside the SDXL fixture would not fit the fixture budget.
FOLDER_VARIANTS = [("sd1", "inpaint"), ("sd1", "pix2pix"), ("sd1", "tiny"), ("sd1", "sdxs"), ("sd2", "inpaint"),
                   ("sd2", "tiny"), ("sd2", "sdxs")]
VAE_TOL = 1e-3    # the tiny autoencoder's decode (SDXS), F16 weights, against diffusers' AutoencoderTiny
DIRECT_VARIANTS = [("sdxl", "vega"), ("sdxl", "ssd-1b")]


def _inputs(family: str, in_channels: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(31)
    x = {"latent": rng.standard_normal((1, in_channels, LATENT, LATENT)).astype(np.float32),
         "timesteps": np.array([600.0], dtype=np.float32),
         "context": rng.standard_normal((1, 77, context_width(family))).astype(np.float32)}
    if y_width(family):
        x["y"] = rng.standard_normal((1, y_width(family))).astype(np.float32)
    return x


def _vae_latent() -> np.ndarray:
    return np.random.default_rng(32).standard_normal((1, 4, LATENT, LATENT)).astype(np.float32)


def _direct_gguf(family: str, variant: str, path) -> None:
    parts = synthetic.synthetic_sources(family, FIXTURE_SEED, variant=variant)
    unet_vae = synthetic.map_unet(parts["unet"]) + synthetic.map_vae(parts["vae"])
    text = synthetic.map_text_encoder(parts["text_encoder"]) + \
        synthetic.map_text_encoder(parts["text_encoder_2"], second=True)
    meta = {keys.FAMILY: family, keys.VARIANT: variant, keys.SYNTHETIC: True}
    gguf_out.write_gguf(path, unet_vae + text, "f16", meta, type_overrides={t.name: "q4_0" for t in text})


def _check(path, family: str, variant: str) -> None:
    mf = read_model_file(path)
    assert (mf.family, mf.variant) == (family, variant)
    assert mf.architecture.upstream_version == UPSTREAM_VERSIONS[(family, variant)]
    cfg = synthetic.model_configs(family, variant=variant)["unet"]
    x = _inputs(family, cfg["in_channels"])
    tiny_vae = variant in TINY_VAE_VARIANTS   # SDXS: its TAE decodes; check it against diffusers' too
    if tiny_vae:
        x["vae_latent"] = _vae_latent()
    ref = reference_arrays(family, x, variant)
    with StableDiffusion(path, threads=2) as sd:
        assert sd.in_channels == cfg["in_channels"]
        ours = sd.unet(x["latent"], x["timesteps"], x["context"], y=x.get("y"))
        if tiny_vae:
            image = sd.decode(x["vae_latent"])
            assert image.shape == ref["vae"].shape == (1, 3, 8 * LATENT, 8 * LATENT)
            vae_err = rel_l2(image, ref["vae"])
            print(f"{family}-{variant}: tiny autoencoder decode rel. L2 {vae_err:.2e} against diffusers")
            assert vae_err <= VAE_TOL
    assert ours.shape == ref["unet"].shape == (1, 4, LATENT, LATENT)
    err = rel_l2(ours, ref["unet"])
    print(f"{family}-{variant}: UNet rel. L2 {err:.2e} against diffusers")
    assert err <= UNET_TOL


@pytest.mark.parametrize("family,variant", FOLDER_VARIANTS)
def test_variant_from_a_diffusers_folder(family, variant, tmp_path):
    folder = synthetic.write_diffusers_folder(tmp_path / "model", family, FIXTURE_SEED, variant=variant)
    out = tmp_path / "model.gguf"
    report = convert(folder, out, "f16")
    shutil.rmtree(folder)
    assert (report.family, report.variant) == (family, variant)
    _check(out, family, variant)


@pytest.mark.parametrize("family,variant", DIRECT_VARIANTS)
def test_distilled_sdxl_unet(family, variant, tmp_path):
    out = tmp_path / "model.gguf"
    _direct_gguf(family, variant, out)
    _check(out, family, variant)
