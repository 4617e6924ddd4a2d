"""Shared fixtures: synthetic SD1.5 / SD2.1 models (real architectures, deterministic random weights) in the
layouts users have (diffusers folder, LDM single file .safetensors and .ckpt), made once and cached between
runs under $PYSDCPP_TEST_CACHE (default ~/.cache/pysdcpp-tests), plus their GGUF conversions.
"""

from __future__ import annotations

import gc
import hashlib
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from converters import convert, synthetic
from converters.sd_layout import map_text_encoder, map_unet, map_vae

FIXTURE_SEED = 1234


def _cache_root() -> Path:
    env = os.environ.get("PYSDCPP_TEST_CACHE")
    root = Path(env) if env else Path.home() / ".cache" / "pysdcpp-tests"
    root.mkdir(parents=True, exist_ok=True)
    return root


def _fixture_key() -> str:
    # Rebuild cached fixtures when the code that makes them changes.
    h = hashlib.sha256()
    import converters

    for mod in ("synthetic.py", "sd_layout.py", "gguf_out.py", "checkpoint_io.py", "__init__.py"):
        h.update((Path(converters.__file__).parent / mod).read_bytes())
    return h.hexdigest()[:12]


def _cached(name: str, make) -> Path:
    """Build `name` in the cache with `make(tmp_path)` unless it is already there (atomic rename)."""
    root = _cache_root() / _fixture_key()
    root.mkdir(parents=True, exist_ok=True)
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
    return _cache_root() / _fixture_key()


def diffusers_folder(family: str) -> Path:
    return _cached(f"{family}-diffusers", lambda p: synthetic.write_diffusers_folder(p, family, FIXTURE_SEED))


def gguf_from_folder(family: str, out_type: str) -> Path:
    folder = diffusers_folder(family)
    return _cached(f"{family}-{out_type}.gguf", lambda p: convert(folder, p, out_type))


def ldm_state(family: str, dtype=np.float16) -> dict[str, np.ndarray]:
    """The synthetic model in LDM single-file names (what original-format checkpoints hold)."""
    parts = synthetic.synthetic_sources(family, FIXTURE_SEED)
    tensors = map_unet(parts["unet"]) + map_vae(parts["vae"]) + map_text_encoder(parts["text_encoder"])
    return {t.name: t.load().astype(dtype) for t in tensors}


def ldm_safetensors(family: str) -> Path:
    from safetensors.numpy import save_file

    def make(p: Path):
        save_file(ldm_state(family), str(p))

    return _cached(f"{family}-ldm-f16.safetensors", make)


def ldm_ckpt(family: str) -> Path:
    def make(p: Path):
        import torch

        state = {k: torch.from_numpy(v) for k, v in ldm_state(family).items()}
        # The layout of original checkpoints: a dict with "state_dict" plus training bookkeeping.
        torch.save({"state_dict": state, "global_step": 470000, "epoch": 6}, str(p))
        del state
        gc.collect()

    return _cached(f"{family}-ldm-f16.ckpt", make)


@pytest.fixture(scope="session")
def sd15_folder() -> Path:
    return diffusers_folder("sd1")


@pytest.fixture(scope="session")
def sd21_folder() -> Path:
    return diffusers_folder("sd2")


@pytest.fixture(scope="session")
def sd15_f16() -> Path:
    return gguf_from_folder("sd1", "f16")


@pytest.fixture(scope="session")
def sd15_ldm_safetensors() -> Path:
    return ldm_safetensors("sd1")


@pytest.fixture(scope="session")
def sd15_ldm_ckpt() -> Path:
    return ldm_ckpt("sd1")


def rel_l2(a: np.ndarray, b: np.ndarray) -> float:
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def unet_against_diffusers(family: str, seed: int, variants: dict[str, dict],
                           weights: str = "f32") -> tuple[dict[str, np.ndarray], np.ndarray]:
    """One UNet evaluation (256 px latent, batch 2 as with guidance, t = 500) per variant (name ->
    StableDiffusion keyword arguments), and diffusers' float32 original on the same inputs. weights="f16": the f16
    file, against the original with the same weights rounded to F16 (all but biases and the embeddings, which
    the converter keeps in F32), so that only the runtime's own roundings remain."""
    import torch
    from diffusers import UNet2DConditionModel

    from pysdcpp import StableDiffusion

    path = gguf_from_folder(family, weights)
    rng = np.random.default_rng(seed)
    width = 768 if family == "sd1" else 1024
    latent = rng.standard_normal((2, 4, 32, 32)).astype(np.float32)
    context = rng.standard_normal((2, 77, width)).astype(np.float32)
    out = {}
    for name, kwargs in variants.items():
        with StableDiffusion(path, threads=2, **kwargs) as sd:
            out[name] = sd.unet(latent, 500.0, context)
    torch.set_num_threads(2)
    unet = UNet2DConditionModel.from_pretrained(diffusers_folder(family) / "unet").eval()
    if weights == "f16":
        with torch.no_grad():
            for name, p in unet.named_parameters():
                if not (name.endswith(".bias") or "embedding" in name):
                    p.copy_(p.half().float())
    with torch.no_grad():
        ref = unet(torch.from_numpy(latent), torch.tensor([500.0, 500.0]),
                   encoder_hidden_states=torch.from_numpy(context)).sample.numpy()
    return out, ref
