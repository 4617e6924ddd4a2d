"""ALTER outputs for the converter: the masks of an ALTER run's `pruning_mask.pth` (read without torch) or
`hypernet/` (its forward pass in numpy), found in a conversion input and checked against its tensors. The units,
the routing and its metadata are the format layer's (pysdcpp.format.unet / .routing). Format facts:
/work/shared/docs/alter-format.md; the metadata contract: docs/alter-gguf.md.
"""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

import numpy as np

from pysdcpp.format.checkpoint_io import LazyTorchTensor, TensorSource, lazy_tensor_loader, load_torch_pickle, read_safetensors
from pysdcpp.format.names import N_TIMESTEPS
from pysdcpp.format.routing import AlterRouting, check_values_01, read_mask_json, routing_from_timestep_masks
from pysdcpp.format.unet import is_alter_config, piece_structure, prunable_units, unit_prefix

from .errors import ConversionError

MASK_FILE = "pruning_mask.pth"
HYPERNET_DIR = "hypernet"
DEFAULT_LAYER_NORM_EPS = 1e-5


# ---- source 1: pruning_mask.pth ----------------------------------------------------------------

def read_pruning_mask(path: str | os.PathLike, family_or_config: str | dict) -> AlterRouting:
    """ALTER's `pruning_mask.pth` (nested list: groups of (1000, piece) 0/1 tensors), read without torch."""
    path = Path(path)
    units = prunable_units(family_or_config)
    pieces = piece_structure(family_or_config)
    obj, zf, prefix = load_torch_pickle(path)
    if not isinstance(obj, (list, tuple)) or not all(isinstance(g, (list, tuple)) for g in obj):
        raise ConversionError(f"{path}: expected a nested list of mask tensors (one list per UNet block group), "
                              f"found {type(obj).__name__}")
    got = [[(t.shape[1] if isinstance(t, LazyTorchTensor) and len(t.shape) == 2 else None) for t in g] for g in obj]
    if len(obj) != len(pieces) or [len(g) for g in obj] != [len(p) for p in pieces] or got != pieces:
        raise ConversionError(f"{path}: mask pieces {_describe_pieces(obj)} do not match this UNet's prunable units "
                              f"{pieces} ({len(units)} units)")
    columns = []
    for gi, group in enumerate(obj):
        for pi, t in enumerate(group):
            if t.shape[0] != N_TIMESTEPS:
                raise ConversionError(f"{path}: group {gi} piece {pi} has {t.shape[0]} rows, expected one per "
                                      f"timestep ({N_TIMESTEPS})")
            columns.append(check_values_01(lazy_tensor_loader(t, zf, prefix)(), f"{path}: group {gi} piece {pi}"))
    return routing_from_timestep_masks(np.concatenate(columns, axis=1), units, MASK_FILE)


def _describe_pieces(obj) -> str:
    try:
        return str([[list(t.shape) if isinstance(t, LazyTorchTensor) else type(t).__name__ for t in g] for g in obj])
    except TypeError:
        return repr(type(obj).__name__)


# ---- source 2: hypernet/ -----------------------------------------------------------------------

def _layer_norm(x: np.ndarray, weight: np.ndarray, bias: np.ndarray, eps: float) -> np.ndarray:
    mean = x.mean(axis=-1, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * weight + bias


def _linear(x: np.ndarray, state: dict, name: str) -> np.ndarray:
    y = x @ state[f"{name}.weight"].T
    bias = state.get(f"{name}.bias")
    return y if bias is None else y + bias


def hypernet_forward(state: dict[str, np.ndarray], base: float, eps: float = DEFAULT_LAYER_NORM_EPS,
                     time_embedding: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """ALTER's hypernetwork without noise, in float64: (keep masks [E, L], expert of each timestep [1000]).

    A unit is kept iff expert_logits + base >= 0 (the sigmoid gate >= 0.5); a timestep goes to the argmax
    of the router logits.
    """
    s = {k: np.asarray(v, dtype=np.float64) for k, v in state.items()}
    x = _layer_norm(s["inputs"], s["ln.weight"], s["ln.bias"], eps)
    x = np.maximum(_layer_norm(_linear(x, s, "linear1"), s["ln2.weight"], s["ln2.bias"], eps), 0.0)
    expert_logits = _linear(x, s, "linear2")[..., 0]
    te = s.get("router.time_embedding") if time_embedding is None else np.asarray(time_embedding, np.float64)
    r = np.maximum(_layer_norm(_linear(te, s, "router.linear1"), s["router.ln.weight"], s["router.ln.bias"], eps),
                   0.0)
    router_logits = _linear(r, s, "router.linear2")
    return expert_logits + base >= 0.0, np.argmax(router_logits, axis=1)


_HYPERNET_SHAPES = {  # name -> shape with symbols: E experts, L units, I input_dim, H hidden_dim, D time dim
    "inputs": ("E", "L", "I"), "ln.weight": ("I",), "ln.bias": ("I",), "linear1.weight": ("H", "I"),
    "linear1.bias": ("H",), "ln2.weight": ("H",), "ln2.bias": ("H",), "linear2.weight": (1, "H"),
    "router.linear1.weight": ("I", "D"), "router.linear1.bias": ("I",), "router.ln.weight": ("I",),
    "router.ln.bias": ("I",), "router.linear2.weight": ("E", "I"),
}
_HYPERNET_OPTIONAL = {"linear2.bias": (1,), "router.linear2.bias": ("E",), "router.time_embedding": (N_TIMESTEPS, "D")}


def read_hypernet(folder: str | os.PathLike, family_or_config: str | dict) -> AlterRouting:
    """Deterministic masks from an ALTER `hypernet/` folder (diffusers save_pretrained layout)."""
    folder = Path(folder)
    units = prunable_units(family_or_config)
    cfg_path = folder / "config.json"
    weights = folder / "diffusion_pytorch_model.safetensors"
    for p in (cfg_path, weights):
        if not p.is_file():
            raise ConversionError(f"{folder}: hypernet folder without {p.name}")
    try:
        cfg = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise ConversionError(f"{cfg_path}: not valid JSON ({e})") from None
    state = {t.name: t.load() for t in read_safetensors(weights)}

    n_units, pieces = len(units), piece_structure(family_or_config)
    if "p_structures" in cfg and cfg["p_structures"] != pieces:
        raise ConversionError(f"{cfg_path}: p_structures {cfg['p_structures']} do not match this UNet's prunable "
                              f"units {pieces}")
    if "inputs" not in state:
        raise ConversionError(f"{weights}: no 'inputs' tensor: not an ALTER hypernetwork")
    n_experts = int(state["inputs"].shape[0]) if state["inputs"].ndim == 3 else -1
    time_embedding = state.get("router.time_embedding")
    if time_embedding is None:
        if "time_embedding" not in cfg:
            raise ConversionError(f"{folder}: no router.time_embedding tensor and no time_embedding in config.json")
        time_embedding = np.asarray(cfg["time_embedding"], dtype=np.float64)
        if time_embedding.ndim != 2:
            raise ConversionError(f"{cfg_path}: time_embedding must be a {N_TIMESTEPS} x D list of lists")
    dims = {"E": n_experts, "L": n_units, "I": cfg.get("input_dim", state["inputs"].shape[-1]),
            "H": cfg.get("hidden_dim", state.get("linear1.weight", np.zeros((0,))).shape[0]),
            "D": int(time_embedding.shape[-1])}
    if "n_intervals" in cfg and cfg["n_intervals"] != n_experts:
        raise ConversionError(f"{cfg_path}: n_intervals is {cfg['n_intervals']} but the inputs tensor holds "
                              f"{n_experts} experts")
    expected = dict(_HYPERNET_SHAPES)
    expected["router.time_embedding"] = (N_TIMESTEPS, "D")
    for name, sym in list(expected.items()) + list(_HYPERNET_OPTIONAL.items()):
        if name == "router.time_embedding":
            arr = time_embedding
        elif name in state:
            arr = state[name]
        elif name in _HYPERNET_OPTIONAL:
            continue
        else:
            raise ConversionError(f"{weights}: missing tensor {name!r}")
        want = tuple(dims[s] if isinstance(s, str) else s for s in sym)
        if tuple(arr.shape) != want:
            what = " (the UNet has %d prunable units)" % n_units if name == "inputs" else ""
            raise ConversionError(f"{folder}: {name} has shape {list(arr.shape)}, expected {list(want)}{what}")
    if not isinstance(cfg.get("base"), (int, float)):
        raise ConversionError(f"{cfg_path}: no numeric 'base' (the gate offset; 4 in ALTER's training script)")
    base = float(cfg["base"])
    eps = next((float(cfg[k]) for k in ("layer_norm_eps", "ln_eps", "eps") if k in cfg), DEFAULT_LAYER_NORM_EPS)
    keep, table = hypernet_forward(state, base, eps, time_embedding)
    return AlterRouting([u.name for u in units], [u.kind for u in units], keep, table.astype(np.int64),
                        "reference", "hypernet")


# ---- convert: find the masks, check them against the tensors, write the metadata -----------------

def _folder_unet_config(folder: Path) -> dict | None:
    cfg = folder / "unet" / "config.json"
    if not cfg.is_file():
        return None
    try:
        return json.loads(cfg.read_text())
    except json.JSONDecodeError as e:
        raise ConversionError(f"{cfg}: not valid JSON ({e})") from None


def find_routing(src: str | os.PathLike, family: str | dict, masks_file: str | os.PathLike | None = None
                 ) -> AlterRouting | None:
    """The routing for a conversion input: the JSON file if given, else an ALTER folder's pruning_mask.pth,
    else its hypernet/; None for an input without masks."""
    src = Path(src)
    config = _folder_unet_config(src) if src.is_dir() else None
    arch: str | dict = config if config is not None else family
    if masks_file is not None:
        return read_mask_json(masks_file, arch)
    if not src.is_dir():
        return None
    if (src / MASK_FILE).is_file():
        return read_pruning_mask(src / MASK_FILE, arch)
    if (src / HYPERNET_DIR).is_dir():
        return read_hypernet(src / HYPERNET_DIR, arch)
    if is_alter_config(config):
        raise ConversionError(f"{src}: an ALTER UNet (Pruned block types) but neither {MASK_FILE} nor {HYPERNET_DIR}/ "
                              "is there; give the masks with --alter-masks FILE.json")
    return None


def attach_routing(src: str | os.PathLike, tensors: list[TensorSource], family: str | dict,
                   masks_file: str | os.PathLike | None = None, drop_unused: bool = False
                   ) -> tuple[list[TensorSource], AlterRouting | None]:
    """Find the input's routing, check every unit against the tensors, and optionally drop never-kept units."""
    routing = find_routing(src, family, masks_file)
    if routing is None:
        if drop_unused:
            raise ConversionError(f"{src}: --drop-unused needs ALTER masks (an ALTER output folder or --alter-masks)")
        return tensors, None
    names = [t.name for t in tensors]
    for unit in routing.units:
        prefix = unit_prefix(unit)
        if not any(n.startswith(prefix) for n in names):
            raise ConversionError(f"{src}: the masks name unit {unit}, but the model has no tensors under {prefix}")
    if not drop_unused:
        return tensors, routing
    dropped = routing.never_kept()
    prefixes = tuple(unit_prefix(u) for u in dropped)
    kept = [t for t in tensors if not t.name.startswith(prefixes)] if prefixes else tensors
    return kept, replace(routing, dropped=dropped)
