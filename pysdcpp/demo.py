"""The embedded default model: a synthetic SD1.5 (random weights, real architecture), made once and cached."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

from ._converters import submodule
from .format import keys
from .format.families import DEFAULT_PREDICTION

DEMO_SEED = 0


def cache_dir() -> Path:
    env = os.environ.get("PYSDCPP_CACHE_DIR")
    base = Path(env) if env else Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "pysdcpp"
    return base


def synthetic_gguf(family: str = "sd1", out_type: str = "f16", seed: int = DEMO_SEED,
                   folder: Path | None = None, progress: Callable[[int, int, str], None] | None = None,
                   alter: bool = False, variant: str = "base") -> Path:
    """Path of the synthetic model's GGUF (a family's UNet variant), writing it first if it is not cached yet; with
    `alter`, plus the demo ALTER routing (synthetic_alter_masks) in its metadata."""
    folder = Path(folder) if folder else cache_dir() / "models"
    folder.mkdir(parents=True, exist_ok=True)
    name = family if variant == "base" else f"{family}-{variant}"
    path = folder / f"synthetic-{name}-seed{seed}-{out_type}{'-alter' if alter else ''}.gguf"
    if path.is_file():
        return path
    tensors = submodule("synthetic").ldm_sources(family, seed, variant=variant)
    meta = {keys.FAMILY: family, keys.VARIANT: variant, keys.SOURCE: f"synthetic {name} seed {seed}",
            keys.SOURCE_LAYOUT: "synthetic", keys.OUTPUT_TYPE: out_type, keys.SYNTHETIC: True,
            keys.PREDICTION: DEFAULT_PREDICTION[family]}
    if alter:
        from .format.routing import routing_metadata

        meta[keys.SOURCE] += " + demo ALTER routing"
        meta.update(routing_metadata(synthetic_alter_masks(family, seed=seed)))
    submodule("gguf_out").write_gguf(path, tensors, out_type, meta, progress)
    return path


def synthetic_diffusers_folder(family: str = "sd1", seed: int = DEMO_SEED, folder: Path | None = None) -> Path:
    """The synthetic model (the same weights as synthetic_gguf's) as a diffusers pipeline folder, written once and
    cached: what the peer runtimes of `pysdcpp bench --peers` load."""
    import shutil

    folder = Path(folder) if folder else cache_dir() / "models"
    path = folder / f"synthetic-{family}-seed{seed}-diffusers"
    if (path / "model_index.json").is_file():
        return path
    tmp = path.with_name(path.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    submodule("synthetic").write_diffusers_folder(tmp, family, seed)   # model_index.json is written last
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)
    return path


def synthetic_alter_masks(family: str = "sd1", n_experts: int = 10, keep_fraction: float = 0.65, size: int = 512,
                          seed: int = DEMO_SEED):
    """Demo ALTER routing: `n_experts` experts, each skipping a random set of units worth about
    1 - keep_fraction of the dense UNet's MACs at `size` px (ALTER's paper: 65%), serving consecutive ranges
    of 1000 / n_experts training timesteps."""
    import numpy as np

    from .format.macs import unet_macs
    from .format.routing import AlterRouting
    from .format.unet import prunable_units

    units = prunable_units(family)
    macs = unet_macs(family, size // 8, size // 8)
    cost = np.array(macs.unit_macs, dtype=np.float64)
    rng = np.random.default_rng(seed)
    masks = np.ones((n_experts, len(units)), dtype=bool)
    budget = (1.0 - keep_fraction) * macs.dense
    for e in range(n_experts):
        saved = 0.0
        for u in rng.permutation(len(units)):
            if saved + cost[u] <= budget * 1.02:
                masks[e, u] = False
                saved += cost[u]
    table = np.minimum(np.arange(1000) * n_experts // 1000, n_experts - 1)
    return AlterRouting([u.name for u in units], [u.kind for u in units], masks, table, "reference",
                        f"synthetic: {n_experts} random experts at {keep_fraction:.0%} of the dense MACs", [])

