"""Converters without the native library: name mapping against diffusers' own LDM converter, the
torch-free checkpoint readers against torch, and the errors bad checkpoints raise."""

from __future__ import annotations

import io
import shutil
import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest
from gguf import GGUFReader

from pysdcpp.converters import ConversionError, convert, synthetic
from pysdcpp.format.checkpoint_io import read_checkpoint_file, read_safetensors
from pysdcpp.format.names import TEXT_PREFIX, UNET_PREFIX, VAE_PREFIX
from pysdcpp.converters.sd_layout import (detect, map_text_encoder, map_unet,
                                  map_vae, text_encoder_name)

import torch  # noqa: E402  (the test extra installs it: no silent skip)


def _meta_sources(params):
    from pysdcpp.format.checkpoint_io import TensorSource

    return [TensorSource(n, s, "F32", lambda: None) for n, s in params]


# The layouts diffusers' LDM converter numbers as stable-diffusion.cpp does (the one-ResNet tiny UNets it numbers
# two slots per level, upstream three: their reference is upstream's own converter, in test_upstream_parity).
_DIFFUSERS_NUMBERED = [("sd1", "base"), ("sd1", "inpaint"), ("sd1", "pix2pix"), ("sd2", "base"), ("sd2", "inpaint"),
                       ("sdxl", "base"), ("sdxl", "inpaint"), ("sdxl", "pix2pix"), ("sdxl", "ssd-1b"),
                       ("sdxl", "vega")]


@pytest.mark.parametrize("family,variant", _DIFFUSERS_NUMBERED)
def test_unet_names_invert_through_diffusers_ldm_converter(family, variant):
    """Our diffusers->LDM names, fed to diffusers' LDM->diffusers converter, give back every original name."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    params = synthetic.component_parameters(family, variant=variant)["unet"]
    mapped = map_unet(_meta_sources(params))
    ldm = {t.name: torch.empty(t.shape, device="meta") for t in mapped}
    cfg = {k: v for k, v in synthetic.model_configs(family, variant=variant)["unet"].items() if not k.startswith("_")}
    back = convert_ldm_unet_checkpoint(ldm, cfg)
    assert {k: tuple(v.shape) for k, v in back.items()} == dict(params)


@pytest.mark.parametrize("family", ["sd1"])
def test_vae_names_invert_through_diffusers_ldm_converter(family):
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    params = synthetic.component_parameters(family)["vae"]
    mapped = map_vae(_meta_sources(params))
    assert all(t.name.startswith(VAE_PREFIX) for t in mapped)
    # LDM stores the mid-block attention as 1x1 convs; diffusers' converter turns them back into linears.
    assert dict((t.name, t.shape) for t in mapped)[VAE_PREFIX + "decoder.mid.attn_1.q.weight"] == (512, 512, 1, 1)
    ldm = {t.name[len(VAE_PREFIX):]: torch.zeros(t.shape) for t in mapped}
    cfg = {k: v for k, v in synthetic.VAE_CONFIG.items() if not k.startswith("_")}
    back = convert_ldm_vae_checkpoint(ldm, cfg)
    assert {k: tuple(v.shape) for k, v in back.items()} == dict(params)


def test_text_encoder_names_with_and_without_text_model_prefix():
    params = synthetic.component_parameters("sd1")["text_encoder"]
    with_prefix = [t.name for t in map_text_encoder(_meta_sources(params))]
    without = [t.name for t in map_text_encoder(_meta_sources(
        [(n[len("text_model."):], s) for n, s in params]))]
    assert with_prefix == without
    assert with_prefix[0] == TEXT_PREFIX + "embeddings.token_embedding.weight"
    assert text_encoder_name("text_model.embeddings.position_ids") is None


def _torch_zip(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def test_ckpt_reader_matches_torch(tmp_path):
    g = torch.Generator().manual_seed(0)
    base = torch.randn(6, 10, generator=g)
    state = {
        "a.weight": torch.randn(3, 4, 5, generator=g),
        "b.half": torch.randn(7, generator=g).half(),
        "c.bf16": torch.randn(4, 4, generator=g).bfloat16(),
        "d.view": base[1:5, 2:9],            # offset into a shared storage
        "e.transposed": base.t(),            # non-contiguous strides
        "f.scalar": torch.tensor(3.5),
        "g.param": torch.nn.Parameter(torch.randn(2, 3, generator=g)),
    }
    path = tmp_path / "m.ckpt"
    torch.save({"state_dict": state, "global_step": 10}, path)
    got = {t.name: t for t in read_checkpoint_file(path)}
    assert set(got) == set(state)
    for name, ref in state.items():
        ref32 = ref.detach().float().numpy()
        arr = got[name].load()
        assert arr.shape == ref32.shape, name
        np.testing.assert_array_equal(arr.astype(np.float32), ref32, err_msg=name)
    assert got["b.half"].dtype == "F16" and got["c.bf16"].dtype == "BF16"


class _Evil:
    def __reduce__(self):
        import os

        return (os.system, ("touch /tmp/pysdcpp-pwned",))


def test_ckpt_reader_refuses_code(tmp_path):
    path = tmp_path / "evil.ckpt"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", pickle.dumps({"x": _Evil()}, protocol=2))
    marker = Path("/tmp/pysdcpp-pwned")
    marker.unlink(missing_ok=True)
    with pytest.raises(ConversionError, match="refusing to load global"):
        read_checkpoint_file(path)
    assert not marker.exists()


def test_legacy_and_garbage_files_are_refused(tmp_path):
    legacy = tmp_path / "old.ckpt"
    legacy.write_bytes(pickle.dumps({"a": 1}, protocol=2))
    with pytest.raises(ConversionError, match="legacy"):
        read_checkpoint_file(legacy)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"hello, this is not a model at all")
    with pytest.raises(ConversionError, match="not a safetensors file"):
        read_checkpoint_file(junk)
    with pytest.raises(ConversionError, match="no such file"):
        read_checkpoint_file(tmp_path / "missing.safetensors")


def test_truncated_safetensors(tmp_path):
    from safetensors.numpy import save_file

    path = tmp_path / "t.safetensors"
    save_file({"w": np.ones((64, 64), np.float32)}, str(path))
    data = path.read_bytes()
    path.write_bytes(data[:-100])
    with pytest.raises(ConversionError, match="truncated"):
        read_safetensors(path)


def test_unsupported_architectures_are_named(tmp_path):
    from safetensors.numpy import save_file

    sdxl = tmp_path / "sdxl.safetensors"
    save_file({"model.diffusion_model.label_emb.0.0.weight": np.zeros((4, 4), np.float16),
               "conditioner.embedders.1.model.ln_final.weight": np.zeros(4, np.float16)}, str(sdxl))
    with pytest.raises(ConversionError, match="SDXL"):
        convert(sdxl, tmp_path / "o.gguf")
    flux = tmp_path / "flux.safetensors"
    save_file({"double_blocks.0.img_attn.qkv.weight": np.zeros((4, 4), np.float16)}, str(flux))
    with pytest.raises(ConversionError, match="Flux"):
        convert(flux, tmp_path / "o.gguf")
    assert not (tmp_path / "o.gguf").exists()
    notdir = tmp_path / "empty"
    notdir.mkdir()
    with pytest.raises(ConversionError, match="unet"):
        convert(notdir, tmp_path / "o.gguf")


def test_detect_family_from_cross_attention_width():
    for family, width in (("sd1", 768), ("sd2", 1024), ("sdxl", 2048)):
        params = synthetic.component_parameters(family)
        srcs = synthetic.map_components({k: _meta_sources(v) for k, v in params.items()})
        info = detect(srcs)
        assert (info.family, info.variant, info.architecture.config["cross_attention_dim"]) == (family, "base", width)
        last = {"sd1": "output_blocks.11.1.", "sd2": "output_blocks.11.1.", "sdxl": "output_blocks.5.1."}[family]
        assert any(t.name.startswith(UNET_PREFIX + last) for t in srcs)


def test_writer_type_rules(tmp_path):
    """The writer's type rules: biases and embeddings keep their type, ne0 not a multiple of the block size
    stays unquantized; f16 rounds like numpy (round to nearest even); no partial file is left behind."""
    from gguf import GGUFReader

    from pysdcpp.format.checkpoint_io import TensorSource
    from pysdcpp.converters.gguf_out import write_gguf

    rng = np.random.default_rng(0)
    arrays = {"x.weight": rng.standard_normal((64, 64)).astype(np.float32),
              "x.bias": rng.standard_normal(64).astype(np.float32),
              "y.token_embedding.weight": rng.standard_normal((10, 64)).astype(np.float32),
              "z.weight": rng.standard_normal((8, 3, 3, 3)).astype(np.float32)}
    srcs = [TensorSource(k, v.shape, "F32", (lambda v=v: v)) for k, v in arrays.items()]
    out = tmp_path / "o.gguf"
    write_gguf(out, srcs, "q8_0", {"k": "v"})
    r = GGUFReader(out)
    types = {t.name: t.tensor_type.name for t in r.tensors}
    assert types == {"x.weight": "Q8_0", "x.bias": "F32", "y.token_embedding.weight": "F32", "z.weight": "F32"}
    write_gguf(out, srcs, "f16", {})
    r = GGUFReader(out)
    t = {t.name: t for t in r.tensors}
    np.testing.assert_array_equal(np.asarray(t["x.weight"].data), arrays["x.weight"].astype(np.float16))
    assert t["z.weight"].tensor_type.name == "F16"
    assert not (tmp_path / "o.gguf.partial").exists()


@pytest.mark.slow
def test_full_size_folder_converts_to_the_fixture_tensors_streaming(tmp_path):
    """The full-size SD1.5 diffusers folder (F16) converts to exactly the tensors of the GGUF the fixtures write
    straight from the same weights (names, types, bytes), and the conversion peaks far below the model's size:
    tensors are read, encoded and written one at a time."""
    import subprocess
    import sys

    from conftest import diffusers_folder, model_gguf

    folder = diffusers_folder("sd1", tmp_path)
    model_bytes = sum(p.stat().st_size for p in folder.rglob("*.safetensors"))
    out = tmp_path / "m.gguf"
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the (large) parent across fork and exec.
    code = ("import sys; from pysdcpp._converters import converters; converters().convert(sys.argv[1], sys.argv[2], "
            "'f16'); print([l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')][0])")
    proc = subprocess.run([sys.executable, "-c", code, str(folder), str(out)], capture_output=True, text=True,
                          check=True)
    shutil.rmtree(folder)
    peak = int(proc.stdout.split()[-1]) * 1024
    assert peak < 0.25 * model_bytes, f"peak RSS {peak / 2**20:.0f} MB for a {model_bytes / 2**20:.0f} MB model"
    ours = GGUFReader(out)
    direct = {t.name: t for t in GGUFReader(model_gguf("sd1")).tensors}
    assert len(ours.tensors) == len(direct)
    for t in ours.tensors:
        d = direct[t.name]
        assert (t.tensor_type, list(t.shape)) == (d.tensor_type, list(d.shape)), t.name
        assert np.array_equal(np.asarray(t.data), np.asarray(d.data)), t.name
    del ours, direct
    out.unlink()


def test_diffusers_folder_records_the_scheduler_prediction(tmp_path):
    """A folder's scheduler config decides the recorded prediction type (v for the SD2.1 layout); --prediction
    overrides it; a reduced model converts with every layout mapped."""
    from conftest import diffusers_folder

    from pysdcpp.format import keys
    from pysdcpp.modelfile import read_model_file

    for family, expected in (("sd1", "eps"), ("sd2", "v")):
        folder = diffusers_folder(family, tmp_path, reduced=True)
        report = convert(folder, tmp_path / f"{family}.gguf", "f16")
        assert (report.family, report.prediction, report.layout) == (family, expected, "diffusers-folder")
        assert read_model_file(report.output).metadata[keys.PREDICTION] == expected
        report = convert(folder, tmp_path / f"{family}.gguf", "f16", prediction="eps", overwrite=True)
        assert read_model_file(report.output).metadata[keys.PREDICTION] == "eps"


def test_existing_output_is_never_overwritten_without_asking(tmp_path):
    from conftest import ldm_safetensors

    src = ldm_safetensors("sd1", tmp_path)
    out = tmp_path / "o.gguf"
    out.write_bytes(b"precious")
    with pytest.raises(ConversionError, match="exists"):
        convert(src, out, "f16")
    assert out.read_bytes() == b"precious"
    convert(src, out, "f16", overwrite=True)
    assert out.read_bytes()[:4] == b"GGUF"
