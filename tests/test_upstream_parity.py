"""Our converter against upstream stable-diffusion.cpp's own: the same tensor names and shapes, the same
bytes (f16 and the quantized types), and upstream's library loads what we write."""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGUFReader

from pysdcpp.converters import convert
from pysdcpp.converters.sd_layout import map_tae
from pysdcpp.format.families import TINY_VAE_VARIANTS, UPSTREAM_VERSIONS
from pysdcpp.format.names import TAE_PREFIX
from pysdcpp import StableDiffusion, _native


def upstream_convert(src, dst, sd_type: str) -> None:
    lib = _native.load("upstream")
    t = lib.lib.str_to_sd_type(sd_type.encode())
    with lib.lock:
        ok = lib.lib.convert(str(src).encode(), b"", str(dst).encode(), t, b"", True)
    assert ok, f"upstream convert failed: {lib.take_errors()}"


def gguf_tensors(path) -> dict[str, tuple[str, tuple[int, ...], bytes]]:
    r = GGUFReader(path)
    return {t.name: (t.tensor_type.name, tuple(int(x) for x in t.shape), np.asarray(t.data).tobytes())
            for t in r.tensors}


@pytest.fixture(scope="module")
def ldm_file(module_tmp):
    """A reduced SD1.5 in LDM names (the layout of original checkpoints): every tensor name and type rule of the
    real one, few channels; upstream's converter reads names and shapes, never runs the model."""
    from conftest import ldm_safetensors

    return ldm_safetensors("sd1", module_tmp)


@pytest.mark.parametrize("out_type", ["f16", "q8_0"])
def test_same_names_shapes_and_bytes_as_upstream_convert(ldm_file, tmp_path, out_type):
    ours, theirs = tmp_path / "ours.gguf", tmp_path / "theirs.gguf"
    convert(ldm_file, ours, out_type)
    upstream_convert(ldm_file, theirs, out_type)
    a, b = gguf_tensors(ours), gguf_tensors(theirs)
    ours.unlink()
    theirs.unlink()
    assert sorted(a) == sorted(b)
    shape_diff = [n for n in a if a[n][:2] != b[n][:2]]
    assert not shape_diff, [(n, a[n][:2], b[n][:2]) for n in shape_diff[:5]]
    byte_diff = [n for n in a if a[n][2] != b[n][2]]
    assert not byte_diff, f"{len(byte_diff)} tensors differ, e.g. {byte_diff[:5]}"


def test_q4_0_same_layout_and_comparable_error(ldm_file, tmp_path):
    """Q4_0: gguf.quants implements ggml's reference quantizer; upstream's converter passes a dummy importance
    matrix, which selects ggml's scale-searching quantizer. Both are valid Q4_0: same names, shapes and types,
    and our quantization error stays close to upstream's."""
    from gguf import GGMLQuantizationType as Q
    from gguf.quants import dequantize

    from pysdcpp.format.checkpoint_io import read_safetensors

    ours, theirs = tmp_path / "ours.gguf", tmp_path / "theirs.gguf"
    convert(ldm_file, ours, "q4_0")
    upstream_convert(ldm_file, theirs, "q4_0")
    a, b = gguf_tensors(ours), gguf_tensors(theirs)
    ours.unlink()
    theirs.unlink()
    assert {n: v[:2] for n, v in a.items()} == {n: v[:2] for n, v in b.items()}
    source = {t.name: t for t in read_safetensors(ldm_file)}
    err_ours = err_theirs = norm = 0.0
    for name, (qtype, shape, data) in a.items():
        if qtype != "Q4_0":
            assert data == b[name][2], name  # unquantized tensors are byte-identical
            continue
        ref = source[name].load().astype(np.float64).reshape(-1)
        raw_a = np.frombuffer(data, np.uint8).reshape(-1, 18)
        raw_b = np.frombuffer(b[name][2], np.uint8).reshape(-1, 18)
        err_ours += float(np.sum((dequantize(raw_a, Q.Q4_0).reshape(-1) - ref) ** 2))
        err_theirs += float(np.sum((dequantize(raw_b, Q.Q4_0).reshape(-1) - ref) ** 2))
        norm += float(np.sum(ref ** 2))
    rel_ours, rel_theirs = (err_ours / norm) ** 0.5, (err_theirs / norm) ** 0.5
    print(f"q4_0 relative RMS error: ours {rel_ours:.4f}, upstream {rel_theirs:.4f}")
    assert rel_theirs < 0.2
    assert rel_ours <= 1.25 * rel_theirs


def test_ckpt_converts_like_safetensors(ldm_file, tmp_path):
    from conftest import ldm_ckpt

    convert(ldm_ckpt("sd1", tmp_path), tmp_path / "a.gguf", "f16")
    convert(ldm_file, tmp_path / "b.gguf", "f16")
    a, b = gguf_tensors(tmp_path / "a.gguf"), gguf_tensors(tmp_path / "b.gguf")
    (tmp_path / "a.gguf").unlink()
    (tmp_path / "b.gguf").unlink()
    assert a == b


@pytest.mark.slow
@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_our_gguf_loads_and_runs_in_upstream(family):
    """Upstream's library loads our file, takes its recorded prediction type, and draws the same image as the
    accelerated library with upstream's kernels."""
    from conftest import model_gguf

    from pysdcpp.format.families import DEFAULT_PREDICTION

    path = model_gguf(family)
    args = dict(width=64, height=64, num_inference_steps=1, seed=3)
    with StableDiffusion(path, backend="upstream", threads=2) as sd:
        assert sd.prediction == DEFAULT_PREDICTION[family]
        theirs = np.asarray(sd.generate("a photo of a cat", **args)[0])
    with StableDiffusion(path, threads=2, conv="im2col", attention="upstream", linear="upstream",
                         batch_guidance=False) as sd:
        ours = np.asarray(sd.generate("a photo of a cat", **args)[0])
    assert theirs.std() > 0
    np.testing.assert_array_equal(ours, theirs)


# ---- every UNet variant, and SDXL's single file --------------------------------------------------------------

@pytest.mark.parametrize("family,variant", sorted(UPSTREAM_VERSIONS))
def test_unet_names_as_upstream_converts_diffusers_names(family, variant, tmp_path):
    """Upstream's converter maps a diffusers-named UNet (its own name tables, per detected version) to the same LDM
    names and shapes as ours, for every variant: the reference for the tiny UNets' three-slot numbering."""
    from safetensors.numpy import save_file

    from pysdcpp.converters import synthetic

    parts = synthetic.synthetic_sources(family, 0, True, variant)
    state = {"unet." + t.name: t.load() for t in parts["unet"]}
    # the text encoders only tell upstream's version detection the family
    state.update({"te." + t.name: t.load() for t in parts["text_encoder"]})
    if "text_encoder_2" in parts:
        state.update({"cond_stage_model.1.transformer." + t.name: t.load() for t in parts["text_encoder_2"]})
    src = tmp_path / "diffusers-names.safetensors"
    save_file(state, str(src))
    upstream_convert(src, tmp_path / "theirs.gguf", "f32")
    theirs = {n: v[1] for n, v in gguf_tensors(tmp_path / "theirs.gguf").items() if n.startswith("model.diffusion_model.")}
    ours = {t.name: tuple(reversed(t.shape)) for t in synthetic.map_unet(parts["unet"])}
    assert ours == theirs
    if variant in TINY_VAE_VARIANTS:
        # SDXS: upstream renames the VAE to its TAE's names, and so must we. The UNet goes in under the LDM names
        # just checked: upstream reads SDXS-0.9's marker (output_blocks.7.1's attn1 reading 1024-wide text) from
        # LDM names only, and takes a diffusers-named SDXS-0.9 for the plain SD2 tiny UNet.
        state = {t.name: t.load() for t in synthetic.map_unet(parts["unet"])}
        state.update({"te." + t.name: t.load() for t in parts["text_encoder"]})
        state.update({"vae." + t.name: t.load() for t in parts["vae"]})
        save_file(state, str(src))
        upstream_convert(src, tmp_path / "theirs-tae.gguf", "f32")
        theirs = {n: v[1] for n, v in gguf_tensors(tmp_path / "theirs-tae.gguf").items() if n.startswith(TAE_PREFIX)}
        ours = {t.name: tuple(reversed(t.shape)) for t in map_tae(parts["vae"])}
        assert len(ours) == 134 and ours == theirs


def test_sdxl_single_file_same_bytes_as_upstream_convert(module_tmp, tmp_path):
    """Stability's SDXL single-file layout (conditioner.embedders.0/1, OpenCLIP's fused in_proj): our f16 GGUF has
    upstream's names, shapes, types and bytes."""
    from conftest import ldm_safetensors

    src = ldm_safetensors("sdxl", module_tmp)
    ours, theirs = tmp_path / "ours.gguf", tmp_path / "theirs.gguf"
    report = convert(src, ours, "f16")
    assert (report.family, report.variant, report.layout) == ("sdxl", "base", "ldm-file")
    upstream_convert(src, theirs, "f16")
    a, b = gguf_tensors(ours), gguf_tensors(theirs)
    assert sorted(a) == sorted(b)
    assert [n for n in a if a[n] != b[n]] == []
