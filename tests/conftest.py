"""Shared fixtures. Full-size synthetic SD1.5 / SD2.1 models (real architectures, deterministic random F16 weights):
one GGUF per family, cached between runs under $PYSDCPP_TEST_CACHE (default ~/.cache/pysdcpp-tests; the SD1.5 one
is the very file `pysdcpp generate --demo` makes); their PyTorch originals built in memory from the same weights;
and checkpoint files in every layout, made in a test's own temporary folder and deleted after it. Converter-only
tests use reduced models (same layout, few channels). Cache budget: about 4.7 GB, plus at most one full-size
temporary checkpoint and its conversion at a time (peak under 10 GB).
"""

from __future__ import annotations

import gc
import hashlib
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from pysdcpp._converters import converters

converters()   # a source checkout's converters/ (PYTHONPATH=.) or the installed pysdcpp.converters
from pysdcpp.demo import DEMO_SEED, synthetic_gguf  # noqa: E402
from pysdcpp.format.families import context_width  # noqa: E402
from pysdcpp.converters import convert, synthetic  # noqa: E402

FIXTURE_SEED = DEMO_SEED   # the SD1.5 fixture is the demo model: one 2 GB file serves both


def _cache_base() -> Path:
    env = os.environ.get("PYSDCPP_TEST_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "pysdcpp-tests"


def _fixture_key() -> str:
    # Rebuild cached fixtures when the code that makes them changes (and only then).
    import pysdcpp.demo
    import pysdcpp.format
    import pysdcpp.converters

    conv, fmt = Path(pysdcpp.converters.__file__).parent, Path(pysdcpp.format.__file__).parent
    h = hashlib.sha256()
    for path in [conv / "synthetic.py", conv / "sd_layout.py", conv / "gguf_out.py", Path(pysdcpp.demo.__file__)] + \
            [fmt / f"{m}.py" for m in ("detect", "families", "keys", "names", "routing", "unet", "vae")]:
        h.update(path.read_bytes())
    return h.hexdigest()[:12]


def _being_built(folder: Path) -> bool:
    """A fixture folder another run may still use (changed in the last 10 minutes, or a partial file in the last 30)."""
    import time

    partial = [p for p in folder.rglob("*") if p.name.endswith((".tmp", ".partial"))]
    return time.time() - folder.stat().st_mtime < 600 or any(time.time() - p.stat().st_mtime < 1800 for p in partial)


def _cache_root() -> Path:
    """This code's fixture folder; folders of older fixture keys are deleted (a new key means new files)."""
    base = _cache_base()
    base.mkdir(parents=True, exist_ok=True)
    key = _fixture_key()
    for old in base.iterdir():
        if old.is_dir() and old.name != key and len(old.name) == 12 and not _being_built(old):
            shutil.rmtree(old, ignore_errors=True)
    root = base / key
    root.mkdir(exist_ok=True)
    return root


def _cached(name: str, make) -> Path:
    """Build `name` in the cache with `make(tmp_path)` unless it is already there (atomic rename)."""
    root = _cache_root()
    final = root / name
    if final.exists():
        return final
    tmp = root / (name + ".tmp")
    if tmp.is_dir():
        shutil.rmtree(tmp)
    elif tmp.exists():
        tmp.unlink()
    make(tmp)
    os.replace(tmp, final)
    return final


@pytest.fixture(scope="session")
def cache_root() -> Path:
    return _cache_root()


def model_gguf(family: str, variant: str = "base") -> Path:
    """The family's full-size synthetic model (a UNet variant of it) as an F16 GGUF (cached)."""
    return synthetic_gguf(family, "f16", seed=FIXTURE_SEED, folder=_cache_root() / "models", variant=variant)


@pytest.fixture(scope="session")
def sd15_f16() -> Path:
    return model_gguf("sd1")


@pytest.fixture(scope="session")
def sd21_f16() -> Path:
    return model_gguf("sd2")


@pytest.fixture(scope="session")
def controlnet_sd15() -> Path:
    """A ControlNet for the SD1.5 fixture: the real architecture (361 M parameters, 723 MB F16), random weights."""
    return _cached("controlnet-sd15-f16.safetensors", lambda p: synthetic.write_controlnet(p, "sd1", seed=11))


# ---- the PyTorch originals ---------------------------------------------------------------------------

# The SD1.x and SD2.x UNet originals take ~20 s each to build (random weights, then copies): built once per run and
# shared by the modules that compare against them (7 GB together), let go before the modules that need the memory.
_SHARED_TORCH: dict[tuple[str, str, str], object] = {}
_SHARED_KEYS = {("sd1", "unet", "base"), ("sd2", "unet", "base")}
_NEEDS_MEMORY = {"test_peers", "test_sdxl", "test_variants"}


@pytest.fixture(autouse=True, scope="module")
def _release_shared_torch_references(request):
    if request.module.__name__.rpartition(".")[2] in _NEEDS_MEMORY and _SHARED_TORCH:
        _SHARED_TORCH.clear()
        gc.collect()
    yield


def torch_reference(family: str, component: str, variant: str = "base", shared: bool = True):
    """diffusers' / transformers' module of a component (unet, vae, text_encoder, text_encoder_2) with the fixture's
    weights (F16 values in float32: exactly what the GGUF holds), built in memory one parameter at a time (peak
    memory: the module itself, 10 GB for SDXL's UNet). The SD1.x/SD2.x UNets are shared within a run (callers
    must not change them; shared=False builds a private one)."""
    key = (family, component, variant)
    if shared and key in _SHARED_TORCH:
        return _SHARED_TORCH[key]
    module = _build_torch_reference(family, component, variant)
    if shared and key in _SHARED_KEYS:
        _SHARED_TORCH[key] = module
    return module


def _build_torch_reference(family: str, component: str, variant: str):
    import torch

    cfg = synthetic.model_configs(family, variant=variant)[component]
    with torch.device("meta"):
        if component == "unet":
            from diffusers import UNet2DConditionModel
            module = UNet2DConditionModel.from_config(cfg)
        elif component == "vae":
            from diffusers import AutoencoderKL, AutoencoderTiny
            module = (AutoencoderTiny if cfg["_class_name"] == "AutoencoderTiny" else AutoencoderKL).from_config(cfg)
        else:
            from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
            kind = CLIPTextModelWithProjection if component == "text_encoder_2" else CLIPTextModel
            module = kind(CLIPTextConfig(**cfg))
    module = module.to_empty(device="cpu")
    params = dict(module.named_parameters())
    loaded = set()
    for t in synthetic.synthetic_sources(family, FIXTURE_SEED, variant=variant)[component]:
        # transformers 5 saves the CLIP text model without the `text_model.` prefix that 4.x used
        name = t.name if t.name in params else t.name.removeprefix("text_model.")
        with torch.no_grad():
            params[name].copy_(torch.from_numpy(t.load().astype(np.float32)))
        loaded.add(name)
    assert loaded == set(params), sorted(set(params) - loaded)[:3]
    for name, buf in module.named_buffers():   # position ids and the like: the modules' own initial values
        if name.endswith("position_ids"):
            buf.copy_(torch.arange(buf.shape[-1]).expand_as(buf))
    gc.collect()
    torch.set_num_threads(2)
    return module.eval()


def expert_rows(family_or_config, skips, seed: int) -> tuple[list[str], list[list[int]]]:
    """(the UNet's ALTER units, one keep row per expert): an expert skips the listed units (LDM names), or for
    None a random third of all units (seeded)."""
    from pysdcpp.format.unet import prunable_units

    units = [u.name for u in prunable_units(family_or_config)]
    rng = np.random.default_rng(seed)
    rows = []
    for skip in skips:
        if skip is None:
            rows.append((rng.random(len(units)) >= 1 / 3).astype(int).tolist())
        else:
            assert set(skip) <= set(units)
            rows.append([0 if u in skip else 1 for u in units])
    return units, rows


def reference_arrays(family: str, inputs: dict[str, np.ndarray], variant: str = "base") -> dict[str, np.ndarray]:
    """torch_reference.py's outputs for `inputs`, computed once in a process of its own (the PyTorch originals of a
    full-size SDXL need 10+ GB that must not share a process with our runtime) and kept beside the fixtures."""
    import subprocess
    import sys

    script = Path(__file__).with_name("torch_reference.py")
    h = hashlib.sha256(script.read_bytes() + Path(__file__).read_bytes() + f"{family}/{variant}".encode())
    for k in sorted(inputs):
        h.update(k.encode() + np.ascontiguousarray(inputs[k]).tobytes())
    folder = _cache_root() / "references"
    folder.mkdir(exist_ok=True)
    out = folder / f"{family}-{variant}-{h.hexdigest()[:16]}.npz"
    if not out.is_file():
        src = folder / f"{out.stem}.inputs.npz"
        np.savez(src, **inputs)
        proc = subprocess.run([sys.executable, str(script), family, str(src), str(out), variant],
                              capture_output=True, text=True, timeout=3600)
        src.unlink(missing_ok=True)
        assert proc.returncode == 0, proc.stderr[-3000:]
    with np.load(out) as f:
        return {k: f[k] for k in f.files}


# ---- checkpoints in the layouts users have, made per test in a temporary folder --------------------------

def diffusers_folder(family: str, folder: Path, reduced: bool = False) -> Path:
    """The synthetic model as a diffusers pipeline folder under `folder` (a test's tmp_path: deleted with it)."""
    return synthetic.write_diffusers_folder(folder / f"{family}{'-reduced' if reduced else ''}-diffusers", family,
                                            FIXTURE_SEED, reduced)


def ldm_state(family: str, reduced: bool = False) -> dict[str, np.ndarray]:
    """The synthetic model in LDM single-file names (what original-format checkpoints hold), F16."""
    return {t.name: t.load() for t in synthetic.ldm_sources(family, FIXTURE_SEED, reduced)}


def _open_clip_state(hf: dict[str, np.ndarray], prefix: str) -> dict[str, np.ndarray]:
    """An HF CLIP text model (q/k/v separate, Linear projection) in OpenCLIP's layout, the way Stability's single
    files hold SDXL's second encoder: fused in_proj, transposed text_projection (written here from OpenCLIP's
    parameter list, not from our converter's table)."""
    out = {}
    hf = {k.removeprefix("text_model."): v for k, v in hf.items()}
    layers = sorted({int(k.split(".")[2]) for k in hf if k.startswith("encoder.layers.")})
    for i in layers:
        p, q = f"encoder.layers.{i}.", f"{prefix}transformer.resblocks.{i}."
        out[q + "attn.in_proj_weight"] = np.concatenate([hf[p + f"self_attn.{x}_proj.weight"] for x in "qkv"])
        out[q + "attn.in_proj_bias"] = np.concatenate([hf[p + f"self_attn.{x}_proj.bias"] for x in "qkv"])
        for ours, theirs in (("self_attn.out_proj", "attn.out_proj"), ("layer_norm1", "ln_1"),
                             ("layer_norm2", "ln_2"), ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj")):
            for w in ("weight", "bias"):
                out[q + f"{theirs}.{w}"] = hf[p + f"{ours}.{w}"]
    out[prefix + "token_embedding.weight"] = hf["embeddings.token_embedding.weight"]
    out[prefix + "positional_embedding"] = hf["embeddings.position_embedding.weight"]
    out[prefix + "ln_final.weight"] = hf["final_layer_norm.weight"]
    out[prefix + "ln_final.bias"] = hf["final_layer_norm.bias"]
    out[prefix + "text_projection"] = np.ascontiguousarray(hf["text_projection.weight"].T)
    out[prefix + "logit_scale"] = np.array(4.6052, dtype=hf["final_layer_norm.weight"].dtype)
    return out


def sdxl_single_file_state(variant: str = "base", reduced: bool = True) -> dict[str, np.ndarray]:
    """The synthetic SDXL in the layout Stability publishes its single files in: LDM UNet and VAE, the CLIP-L
    encoder under conditioner.embedders.0.transformer., OpenCLIP bigG under conditioner.embedders.1.model."""
    parts = synthetic.synthetic_sources("sdxl", FIXTURE_SEED, reduced, variant)
    state = {t.name: t.load() for t in synthetic.map_unet(parts["unet"]) + synthetic.map_vae(parts["vae"])}
    for t in parts["text_encoder"]:
        state["conditioner.embedders.0.transformer.text_model." + t.name.removeprefix("text_model.")] = t.load()
    state["conditioner.embedders.0.transformer.text_model.embeddings.position_ids"] = \
        np.arange(77, dtype=np.int64)[None]
    state.update(_open_clip_state({t.name: t.load() for t in parts["text_encoder_2"]}, "conditioner.embedders.1.model."))
    return state


def ldm_safetensors(family: str, folder: Path, reduced: bool = True) -> Path:
    from safetensors.numpy import save_file

    path = folder / f"{family}-ldm.safetensors"
    save_file(sdxl_single_file_state(reduced=reduced) if family == "sdxl" else ldm_state(family, reduced), str(path))
    return path


def ldm_ckpt(family: str, folder: Path, reduced: bool = True) -> Path:
    import torch

    path = folder / f"{family}-ldm.ckpt"
    state = {k: torch.from_numpy(v) for k, v in ldm_state(family, reduced).items()}
    # The layout of original checkpoints: a dict with "state_dict" plus training bookkeeping.
    torch.save({"state_dict": state, "global_step": 470000, "epoch": 6}, str(path))
    return path


@pytest.fixture(scope="module")
def module_tmp(tmp_path_factory):
    """A temporary folder for one test module, deleted when the module is done (pytest keeps its last folders)."""
    folder = tmp_path_factory.mktemp("module")
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


# One SDXL UNet evaluation at 128 px against diffusers' float32 original with the same F16 weights: the runtime's
# F16 roundings of activations add up over SDXL's 70 transformer blocks. Measured 2026-12-02 on a 2-core Intel Xeon
# (Sapphire Rapids class, AVX-512 with FP16): upstream's own path (every acceleration off) 1.75-1.89e-3 and ours
# 1.44-1.84e-3 on the dense model, ALTER-routed experts and DeepCache steps up to 2.43e-3; the Zen 4 class EPYC of
# earlier runs stayed under 2e-3. The SD1.x/SD2.x bound stays 2e-3 (test_components).
SDXL_UNET_TOL = 3e-3


def psnr(a, b) -> float:
    """PSNR in dB of two 8-bit images (PIL or arrays); inf when identical."""
    import math

    mse = np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2)
    return 10 * math.log10(255.0 ** 2 / mse) if mse else float("inf")


def assert_within_plain_psnr(label: str, accelerated, upstream, plain_accelerated, plain_upstream) -> None:
    """The accelerated library's image of a feature against upstream's, within the PSNR its plain text-to-image
    shows at the same settings (capped at 40 dB) minus 3 dB: the generation surface's bound."""
    base, got = psnr(plain_accelerated, plain_upstream), psnr(accelerated, upstream)
    print(f"{label}: accelerated vs upstream {got:.1f} dB (plain txt2img {base:.1f} dB)")
    assert got >= min(base, 40.0) - 3.0


def rss_mb() -> float:
    """This process's resident memory in MB (what the soak and cancel tests measure)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


_CLI_FLAGS = {"prompt": "-p", "negative_prompt": "-n", "width": "-W", "height": "-H", "num_inference_steps": "--steps",
              "guidance_scale": "--cfg-scale", "sampler": "--sampling-method", "seed": "--seed"}


def sd_cli_image(model, settings: dict, out_dir: Path, *extra: str) -> np.ndarray:
    """The RGB image upstream's sd-cli makes for `settings` (generate()'s names; None values left out) plus
    `extra` arguments, 2 threads; skips the test where sd-cli was not built."""
    import subprocess

    from PIL import Image

    from pysdcpp import _native

    cli = _native.upstream_cli()
    if cli is None:
        pytest.skip("upstream sd-cli was not built (PYSDCPP_BUILD_CLI=OFF)")
    out = Path(out_dir) / "cli.png"
    cmd = [str(cli), "-m", str(model), "-t", "2", "-o", str(out)]
    for key, value in settings.items():
        if value is not None and key in _CLI_FLAGS:
            cmd += [_CLI_FLAGS[key], str(value)]
    proc = subprocess.run(cmd + list(extra), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return np.asarray(Image.open(out).convert("RGB"))


def rel_l2(a: np.ndarray, b: np.ndarray) -> float:
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def unet_against_diffusers(family: str, seed: int, variants: dict[str, dict]
                           ) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """One UNet evaluation (256 px latent, batch 2 as with guidance, t = 500) per variant (name ->
    StableDiffusion keyword arguments), and diffusers' float32 original with the same F16 weights on the same
    inputs, so that only the runtime's own roundings remain."""
    import torch

    from pysdcpp import StableDiffusion

    path = model_gguf(family)
    rng = np.random.default_rng(seed)
    latent = rng.standard_normal((2, 4, 32, 32)).astype(np.float32)
    context = rng.standard_normal((2, 77, context_width(family))).astype(np.float32)
    out = {}
    for name, kwargs in variants.items():
        with StableDiffusion(path, threads=2, **kwargs) as sd:
            out[name] = sd.unet(latent, 500.0, context)
    unet = torch_reference(family, "unet")
    with torch.no_grad():
        ref = unet(torch.from_numpy(latent), torch.tensor([500.0, 500.0]),
                   encoder_hidden_states=torch.from_numpy(context)).sample.numpy()
    del unet
    gc.collect()
    return out, ref


__all__ = ["convert", "FIXTURE_SEED"]
