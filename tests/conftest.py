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
            [fmt / f"{m}.py" for m in ("families", "keys", "names", "routing", "unet", "vae")]:
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


def model_gguf(family: str) -> Path:
    """The family's full-size synthetic model as an F16 GGUF (cached)."""
    return synthetic_gguf(family, "f16", seed=FIXTURE_SEED, folder=_cache_root() / "models")


@pytest.fixture(scope="session")
def sd15_f16() -> Path:
    return model_gguf("sd1")


@pytest.fixture(scope="session")
def sd21_f16() -> Path:
    return model_gguf("sd2")


# ---- the PyTorch originals ---------------------------------------------------------------------------

def torch_reference(family: str, component: str):
    """diffusers' / transformers' module of a component (unet, vae, text_encoder) with the fixture's weights (F16
    values in float32: exactly what the GGUF holds), built in memory."""
    import torch

    cfg = synthetic.model_configs(family)[component]
    if component == "unet":
        from diffusers import UNet2DConditionModel
        module = UNet2DConditionModel.from_config(cfg)
    elif component == "vae":
        from diffusers import AutoencoderKL
        module = AutoencoderKL.from_config(cfg)
    else:
        from transformers import CLIPTextConfig, CLIPTextModel
        module = CLIPTextModel(CLIPTextConfig(**cfg))
    own = set(module.state_dict())
    state = {}
    for t in synthetic.synthetic_sources(family, FIXTURE_SEED)[component]:
        # transformers 5 saves the CLIP text model without the `text_model.` prefix that 4.x used
        name = t.name if t.name in own else t.name.removeprefix("text_model.")
        state[name] = torch.from_numpy(t.load().astype(np.float32))
    missing, unexpected = module.load_state_dict(state, strict=False)
    assert not unexpected and all(k.endswith("position_ids") for k in missing), (missing[:3], unexpected[:3])
    del state
    gc.collect()
    torch.set_num_threads(2)
    return module.eval()


# ---- checkpoints in the layouts users have, made per test in a temporary folder --------------------------

def diffusers_folder(family: str, folder: Path, reduced: bool = False) -> Path:
    """The synthetic model as a diffusers pipeline folder under `folder` (a test's tmp_path: deleted with it)."""
    return synthetic.write_diffusers_folder(folder / f"{family}{'-reduced' if reduced else ''}-diffusers", family,
                                            FIXTURE_SEED, reduced)


def ldm_state(family: str, reduced: bool = False) -> dict[str, np.ndarray]:
    """The synthetic model in LDM single-file names (what original-format checkpoints hold), F16."""
    return {t.name: t.load() for t in synthetic.ldm_sources(family, FIXTURE_SEED, reduced)}


def ldm_safetensors(family: str, folder: Path, reduced: bool = True) -> Path:
    from safetensors.numpy import save_file

    path = folder / f"{family}-ldm.safetensors"
    save_file(ldm_state(family, reduced), str(path))
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
