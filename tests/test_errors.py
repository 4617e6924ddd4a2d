"""Bad input raises a Python exception with a clear message; the process survives and nothing is lost."""

from __future__ import annotations

import numpy as np
import pytest

from pysdcpp import ModelLoadError, PySDCppError, StableDiffusion


def _tiny_gguf(path, names):
    from gguf import GGUFWriter

    w = GGUFWriter(path, "stable-diffusion")
    for n in names:
        w.add_tensor(n, np.ones((4, 4), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize("backend", ["upstream", "accelerated"])
def test_missing_file(tmp_path, backend):
    with pytest.raises(ModelLoadError, match="no such file"):
        StableDiffusion(tmp_path / "nope.gguf", backend=backend)


def test_not_a_model(tmp_path):
    p = tmp_path / "notes.gguf"
    p.write_text("just some text, definitely not a model\n" * 10)
    with pytest.raises(ModelLoadError, match="not a model file"):
        StableDiffusion(p)


def test_truncated_gguf(tmp_path):
    p = _tiny_gguf(tmp_path / "t.gguf", ["a.weight", "b.weight"])
    data = p.read_bytes()
    for cut in (len(data) - 10, 40, 12):
        p.write_bytes(data[:cut])
        with pytest.raises(ModelLoadError, match="truncated|corrupt"):
            StableDiffusion(p)


@pytest.mark.parametrize("backend", ["upstream", "accelerated"])
def test_unsupported_architecture(tmp_path, backend):
    p = _tiny_gguf(tmp_path / "odd.gguf", ["model.some_network.layer0.weight", "model.some_network.layer1.weight"])
    with pytest.raises(ModelLoadError, match="could not load"):
        StableDiffusion(p, backend=backend)
    assert p.exists()  # the user's file is untouched


def test_bad_constructor_arguments(sd15_f16):
    with pytest.raises(ValueError, match="backend"):
        StableDiffusion(sd15_f16, backend="gpu")
    with pytest.raises(ValueError, match="threads"):
        StableDiffusion(sd15_f16, threads=0)
    with pytest.raises(ValueError, match="prediction"):
        StableDiffusion(sd15_f16, prediction="x")
    with pytest.raises(ValueError, match="conv must be one of im2col, direct with the upstream library"):
        StableDiffusion(sd15_f16, backend="upstream", conv="winograd")
    with pytest.raises(ValueError, match="winograd_cache_mb"):
        StableDiffusion(sd15_f16, winograd_cache_mb=-1)
    with pytest.raises(ValueError, match="attention must be one of upstream with the upstream library"):
        StableDiffusion(sd15_f16, backend="upstream", attention="fast")
    with pytest.raises(ValueError, match="attention must be one of upstream, fast"):
        StableDiffusion(sd15_f16, attention="flash")
    with pytest.raises(ValueError, match="linear must be one of upstream with the upstream library"):
        StableDiffusion(sd15_f16, backend="upstream", linear="fast")
    with pytest.raises(ValueError, match="linear must be one of upstream, fast"):
        StableDiffusion(sd15_f16, linear="blas")


@pytest.fixture(scope="module")
def sd(sd15_f16):
    with StableDiffusion(sd15_f16, threads=2) as ctx:
        yield ctx


@pytest.mark.parametrize("kwargs, message", [
    (dict(width=100), "multiple of 8"),
    (dict(width=200), "multiple of 64"),
    (dict(height=0), "multiple of 8"),
    (dict(num_inference_steps=0), "at least 1"),
    (dict(guidance_scale=float("nan")), "finite"),
    (dict(sampler="warp_drive"), "unknown sampler"),
    (dict(scheduler="sometimes"), "unknown scheduler"),
    (dict(batch_size=0), "batch_size"),
    (dict(step_cache="fastcache"), "unknown step cache 'fastcache'"),
    (dict(step_cache="ucache:w=0.4"), "unknown ucache option 'w'; it takes threshold, start"),
    (dict(step_cache="ucache:threshold=-1"), r"threshold=-1 is outside \[0, inf\]"),
    (dict(step_cache="ucache:start=0.9,end=0.5"), "start < end"),
    (dict(step_cache="ucache:reset=2"), "0 or 1"),
    (dict(step_cache="spectrum:m=1.5"), "not a whole number"),
    (dict(step_cache="ucache:threshold"), "needs key=value"),
    (dict(step_cache="ucache", inheritance="deepcache"), "use one"),
])
def test_bad_generation_parameters(sd, kwargs, message):
    with pytest.raises(ValueError, match=message):
        sd.generate("x", **kwargs)


def test_bad_component_shapes(sd):
    with pytest.raises(ValueError, match="latent"):
        sd.unet(np.zeros((1, 3, 8, 8), np.float32), 10, np.zeros((1, 77, 768), np.float32))
    with pytest.raises(ValueError, match="multiples of 8"):
        sd.unet(np.zeros((1, 4, 12, 8), np.float32), 10, np.zeros((1, 77, 768), np.float32))
    with pytest.raises(ValueError, match="context"):
        sd.unet(np.zeros((1, 4, 8, 8), np.float32), 10, np.zeros((1, 77, 1024), np.float32))
    with pytest.raises(ValueError, match="latent"):
        sd.decode(np.zeros((4, 8, 8), np.float32))


def test_upstream_has_no_component_calls(sd15_f16):
    with StableDiffusion(sd15_f16, backend="upstream", threads=2) as ctx:
        with pytest.raises(PySDCppError, match="accelerated"):
            ctx.encode_prompt("x")


def test_closed_context(sd15_f16):
    ctx = StableDiffusion(sd15_f16, threads=2)
    ctx.close()
    ctx.close()  # idempotent
    with pytest.raises(PySDCppError, match="closed"):
        ctx.generate("x", width=64, height=64, num_inference_steps=1)


def _reduced_gguf(path, variant: str, metadata: dict, only: str | None = None):
    """The reduced synthetic SD1.x (all of it, or only the tensors whose name has `only`) as a GGUF."""
    from pysdcpp.converters import gguf_out, synthetic

    sources = [t for t in synthetic.ldm_sources("sd1", 0, reduced=True, variant=variant) if only is None or only in t.name]
    gguf_out.write_gguf(path, sources, "f16", metadata)
    return path


def test_a_unet_file_replaces_the_models_tensors_of_the_same_name(tmp_path):
    """Upstream's --diffusion-model: the UNet file's tensors (prefixed where they are not) replace the model's; what
    describes the UNet comes from the UNet file, its family and variant from the merged tensors."""
    from gguf import GGUFReader

    from pysdcpp.format import keys
    from pysdcpp.format.names import UNET_PREFIX
    from pysdcpp.modelfile import read_model_file, with_unet

    model = read_model_file(_reduced_gguf(tmp_path / "m.gguf", "base", {
        keys.FAMILY: "sd1", keys.VARIANT: "base", keys.FEW_STEP: "turbo", keys.SYNTHETIC: True}))
    conv_in = UNET_PREFIX + "input_blocks.0.0.weight"
    unet_path = _reduced_gguf(tmp_path / "u.gguf", "inpaint", {}, only=conv_in)
    assert [t.name for t in GGUFReader(unet_path).tensors] == [conv_in]
    merged = with_unet(model, read_model_file(unet_path))
    assert (model.variant, merged.variant, merged.family) == ("base", "inpaint", "sd1")
    assert model.few_step == "turbo" and merged.few_step is None
    assert merged.metadata[keys.SYNTHETIC] is True
    shapes = {t.name: t.shape for t in merged.tensors}
    assert len(shapes) == len(model.tensors) and shapes[conv_in][2] == 9   # GGUF order: (3, 3, C_in, C_out)
    # a UNet file under bare names: upstream adds the prefix, and so does the merge
    from gguf import GGUFWriter

    w = GGUFWriter(tmp_path / "bare.gguf", "stable-diffusion")
    w.add_tensor("input_blocks.0.0.weight", np.ones((32, 9, 3, 3), np.float16))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    bare = with_unet(model, read_model_file(tmp_path / "bare.gguf"))
    assert {t.name for t in bare.tensors} == set(shapes) and bare.variant == "inpaint"


def test_bad_unet_files_fail_before_the_load(tmp_path, sd15_f16):
    from pysdcpp.format.names import VAE_PREFIX

    whole = _reduced_gguf(tmp_path / "whole.gguf", "base", {}, only=VAE_PREFIX + "decoder.conv_in")
    with pytest.raises(ModelLoadError, match="not a UNet tensor"):
        StableDiffusion(sd15_f16, unet=whole)
    st = tmp_path / "unet.safetensors"
    from safetensors.numpy import save_file
    save_file({"model.diffusion_model.input_blocks.0.0.weight": np.ones((320, 9, 3, 3), np.float16)}, str(st))
    with pytest.raises(ModelLoadError, match="must be GGUF"):
        StableDiffusion(sd15_f16, unet=st)
    with pytest.raises(ModelLoadError, match="no such file"):
        StableDiffusion(sd15_f16, unet=tmp_path / "nope.gguf")
    assert whole.exists() and st.exists()
