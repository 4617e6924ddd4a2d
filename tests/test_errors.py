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
