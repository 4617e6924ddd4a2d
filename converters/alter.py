"""ALTER (layer pruning with temporal expert routing) for SD1.x/SD2.x UNets, in numpy only.

The prunable-unit table derived from a UNet config, the three mask sources (an ALTER run's
`pruning_mask.pth` or `hypernet/`, or a JSON mask file from any pruning method), the GGUF routing
metadata (write and read), and MAC accounting per unit and per expert. Format facts:
/work/shared/docs/alter-format.md; the metadata contract: docs/alter-gguf.md.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Sequence

import numpy as np

from . import keys
from .checkpoint_io import LazyTorchTensor, TensorSource, lazy_tensor_loader, load_torch_pickle, read_safetensors
from .errors import ConversionError
from .sd_layout import UNET_PREFIX

ALTER_FORMAT_VERSION = 1
N_TIMESTEPS = 1000
SKIP_SEMANTICS = ("reference", "consume")
UNIT_KINDS = ("transformer", "resnet")
MASK_FILE = "pruning_mask.pth"
HYPERNET_DIR = "hypernet"
DEFAULT_LAYER_NORM_EPS = 1e-5


# ---- the UNet config and its prunable units ----------------------------------------------------

def normalize_unet_config(config: dict) -> dict:
    """A diffusers UNet config with ALTER's `Pruned` class-name suffixes removed."""

    def strip(name):
        return name[: -len("Pruned")] if isinstance(name, str) and name.endswith("Pruned") else name

    out = dict(config)
    for key in ("_class_name", "mid_block_type"):
        if key in out:
            out[key] = strip(out[key])
    for key in ("down_block_types", "up_block_types"):
        if key in out:
            out[key] = [strip(n) for n in out[key]]
    return out


def unet_config(family_or_config: str | dict) -> dict:
    """The (normalized) UNet config of a family name ("sd1", "sd2") or of a diffusers config dict."""
    if isinstance(family_or_config, str):
        from .synthetic import UNET_CONFIGS

        if family_or_config not in UNET_CONFIGS:
            raise ConversionError(f"ALTER routing needs an SD1.x or SD2.x UNet, not {family_or_config!r}")
        return dict(UNET_CONFIGS[family_or_config])
    cfg = normalize_unet_config(family_or_config)
    for key in ("block_out_channels", "down_block_types", "up_block_types", "layers_per_block"):
        if key not in cfg:
            raise ConversionError(f"UNet config has no {key!r}: not a diffusers UNet2DConditionModel config")
    if not isinstance(cfg["layers_per_block"], int):
        raise ConversionError("UNet configs with a per-block layers_per_block list are not supported")
    n = len(cfg["block_out_channels"])
    if len(cfg["down_block_types"]) != n or len(cfg["up_block_types"]) != n:
        raise ConversionError("UNet config: block type lists and block_out_channels differ in length")
    known = {"CrossAttnDownBlock2D", "DownBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"}
    bad = [t for t in cfg["down_block_types"] + cfg["up_block_types"] if t not in known]
    if bad:
        raise ConversionError(f"UNet config: block type {bad[0]!r} is not an SD1.x/SD2.x block")
    mid = cfg.get("mid_block_type", "UNetMidBlock2DCrossAttn")
    if mid != "UNetMidBlock2DCrossAttn":
        raise ConversionError(f"UNet config: mid block {mid!r} is not an SD1.x/SD2.x mid block")
    return cfg


@dataclass(frozen=True)
class PrunableUnit:
    """One unit ALTER can skip: a BasicTransformerBlock or a ResNet."""

    index: int      # position in ALTER order (the column of a mask row)
    name: str       # LDM name relative to `model.diffusion_model.`, e.g. input_blocks.1.1.transformer_blocks.0
    kind: str       # "transformer" | "resnet"
    diffusers: str  # e.g. down_blocks.0.attentions.0.transformer_blocks.0, up_blocks.1.resnets.2
    group: int      # ALTER block group: down blocks, then up blocks, then the mid block
    block: str      # the diffusers block type holding it: CrossAttnDownBlock2D, UpBlock2D, UNetMidBlock2DCrossAttn ...


def _transformer_layers(cfg: dict) -> list[int]:
    n = len(cfg["block_out_channels"])
    tl = cfg.get("transformer_layers_per_block", 1)
    tl = [tl] * n if isinstance(tl, int) else list(tl)
    if len(tl) != n:
        raise ConversionError("UNet config: transformer_layers_per_block has the wrong length")
    return tl


def _unit_groups(cfg: dict) -> list[list[list[tuple[str, str, str, str]]]]:
    """Groups -> pieces -> units (ldm name, kind, diffusers name, block type), in ALTER order."""
    boc, lpb = cfg["block_out_channels"], cfg["layers_per_block"]
    n = len(boc)
    tl = _transformer_layers(cfg)
    groups = []
    for i, btype in enumerate(cfg["down_block_types"]):
        cin, cout = (boc[i - 1] if i else boc[0]), boc[i]
        pieces = []
        if btype.startswith("CrossAttn"):
            for j in range(lpb):
                pieces.append([(f"input_blocks.{i * (lpb + 1) + j + 1}.1.transformer_blocks.{k}", "transformer",
                                f"down_blocks.{i}.attentions.{j}.transformer_blocks.{k}", btype)
                               for k in range(tl[i])])
        # A ResNet that changes the channel count cannot be skipped.
        resnets = [j for j in range(lpb) if not (j == 0 and cin != cout)]
        pieces.append([(f"input_blocks.{i * (lpb + 1) + j + 1}.0", "resnet", f"down_blocks.{i}.resnets.{j}", btype)
                       for j in resnets])
        groups.append([p for p in pieces if p])
    rev, rev_tl = list(reversed(boc)), list(reversed(tl))
    for i, btype in enumerate(cfg["up_block_types"]):
        prev, cout = (rev[i - 1] if i else rev[0]), rev[i]
        pieces = []
        if btype.startswith("CrossAttn"):
            for j in range(lpb + 1):
                pieces.append([(f"output_blocks.{i * (lpb + 1) + j}.1.transformer_blocks.{k}", "transformer",
                                f"up_blocks.{i}.attentions.{j}.transformer_blocks.{k}", btype)
                               for k in range(rev_tl[i])])
        resnets = [j for j in range(lpb + 1) if not (j == 0 and prev != cout)]
        pieces.append([(f"output_blocks.{i * (lpb + 1) + j}.0", "resnet", f"up_blocks.{i}.resnets.{j}", btype)
                       for j in resnets])
        groups.append([p for p in pieces if p])
    mid = "UNetMidBlock2DCrossAttn"
    groups.append([
        [(f"middle_block.1.transformer_blocks.{k}", "transformer", f"mid_block.attentions.0.transformer_blocks.{k}",
          mid) for k in range(tl[-1])],
        [("middle_block.0", "resnet", "mid_block.resnets.0", mid), ("middle_block.2", "resnet", "mid_block.resnets.1",
                                                                    mid)],
    ])
    return groups


def prunable_units(family_or_config: str | dict) -> list[PrunableUnit]:
    """The prunable units of an SD1.x/SD2.x UNet in ALTER order (34 for the standard configs)."""
    cfg = unet_config(family_or_config)
    out = []
    for g, pieces in enumerate(_unit_groups(cfg)):
        for piece in pieces:
            for ldm, kind, diff, btype in piece:
                out.append(PrunableUnit(len(out), ldm, kind, diff, g, btype))
    return out


def piece_structure(family_or_config: str | dict) -> list[list[int]]:
    """ALTER's nested piece sizes (its `p_structures`): per group, the size of each piece."""
    return [[len(p) for p in pieces] for pieces in _unit_groups(unet_config(family_or_config))]


def unit_prefix(name: str) -> str:
    """Prefix of every GGUF tensor belonging to a unit (the trailing dot keeps output_blocks.1 off output_blocks.10)."""
    return f"{UNET_PREFIX}{name}."


# ---- the routing -------------------------------------------------------------------------------

@dataclass
class AlterRouting:
    """Experts (keep masks over the prunable units) and the expert of each training timestep 0..999."""

    units: list[str]
    kinds: list[str]
    masks: np.ndarray           # bool [E, U], True = keep
    table: np.ndarray           # int [1000], expert of each training timestep
    semantics: str = "reference"
    source: str = ""
    dropped: list[str] = field(default_factory=list)

    @property
    def n_experts(self) -> int:
        return int(self.masks.shape[0])

    @property
    def n_units(self) -> int:
        return len(self.units)

    def expert_for_timestep(self, t: float) -> int:
        """The expert for a (possibly fractional) model timestep: nearest integer, clamped to 0..999."""
        if not math.isfinite(t):
            raise ValueError(f"timestep must be finite, not {t}")
        i = min(max(int(math.floor(t + 0.5)), 0), N_TIMESTEPS - 1)
        return int(self.table[i])

    def mask_for_timestep(self, t: float) -> np.ndarray:
        return self.masks[self.expert_for_timestep(t)]

    def timestep_ranges(self, expert: int) -> list[tuple[int, int]]:
        """Inclusive ranges of training timesteps routed to `expert`."""
        hit = np.flatnonzero(self.table == expert)
        if hit.size == 0:
            return []
        breaks = np.flatnonzero(np.diff(hit) > 1)
        starts = np.concatenate([[hit[0]], hit[breaks + 1]])
        ends = np.concatenate([hit[breaks], [hit[-1]]])
        return [(int(a), int(b)) for a, b in zip(starts, ends)]

    def never_kept(self) -> list[str]:
        """Units that no expert keeps (what `drop_unused` leaves out)."""
        return [u for u, any_keep in zip(self.units, self.masks.any(axis=0)) if not any_keep]


def routing_from_timestep_masks(rows: np.ndarray, units: Sequence[PrunableUnit], source: str,
                                semantics: str = "reference") -> AlterRouting:
    """Deduplicate per-timestep keep rows [1000, U] into experts, in order of first appearance."""
    rows = np.asarray(rows, dtype=bool)
    _, first, inverse = np.unique(rows, axis=0, return_index=True, return_inverse=True)
    order = np.argsort(first)            # unique rows sorted by first appearance
    rank = np.empty_like(order)
    rank[order] = np.arange(order.size)
    masks = rows[first[order]]
    table = rank[inverse.reshape(-1)]
    return AlterRouting([u.name for u in units], [u.kind for u in units], masks, table.astype(np.int64),
                        semantics, source)


def _check_values_01(array: np.ndarray, what: str) -> np.ndarray:
    a = np.asarray(array, dtype=np.float64)
    if not np.all(np.isfinite(a)) or not np.all((a == 0.0) | (a == 1.0)):
        bad = a[~((a == 0.0) | (a == 1.0))].ravel()[:3]
        raise ConversionError(f"{what}: mask values must be exactly 0 or 1, found {bad.tolist()}")
    return a == 1.0


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
            columns.append(_check_values_01(lazy_tensor_loader(t, zf, prefix)(), f"{path}: group {gi} piece {pi}"))
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


# ---- source 3: JSON mask files -----------------------------------------------------------------

def _unit_lookup(units: Sequence[PrunableUnit]) -> dict[str, int]:
    out = {}
    for u in units:
        out[u.name] = out[UNET_PREFIX + u.name] = out[u.diffusers] = u.index
    return out


def read_mask_json(path: str | os.PathLike, family_or_config: str | dict) -> AlterRouting:
    """A JSON mask file (schema in docs/alter-gguf.md): experts + timestep table, or one mask row per timestep."""
    path = Path(path)
    units = prunable_units(family_or_config)
    if not path.is_file():
        raise ConversionError(f"{path}: no such mask file")
    try:
        doc = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConversionError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(doc, dict):
        raise ConversionError(f"{path}: the mask file must hold a JSON object")
    allowed = {"format", "version", "units", "experts", "timestep_expert", "timestep_masks", "skip_semantics"}
    extra = sorted(set(doc) - allowed)
    if extra:
        raise ConversionError(f"{path}: unknown key {extra[0]!r} (allowed: {', '.join(sorted(allowed))})")
    if doc.get("format", "pysdcpp.alter-masks") != "pysdcpp.alter-masks" or doc.get("version", 1) != 1:
        raise ConversionError(f"{path}: unsupported format {doc.get('format')!r} version {doc.get('version')!r} "
                              "(expected pysdcpp.alter-masks version 1)")
    semantics = doc.get("skip_semantics", "reference")
    if semantics not in SKIP_SEMANTICS:
        raise ConversionError(f"{path}: skip_semantics must be one of {', '.join(SKIP_SEMANTICS)}, not {semantics!r}")

    lookup = _unit_lookup(units)
    if "units" in doc:
        names = doc["units"]
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise ConversionError(f"{path}: 'units' must be a list of unit names")
        unknown = [n for n in names if n not in lookup]
        if unknown:
            raise ConversionError(f"{path}: unknown unit {unknown[0]!r}; the prunable units are "
                                  f"{', '.join(u.name for u in units)}")
        columns = [lookup[n] for n in names]
        if len(set(columns)) != len(columns):
            dup = next(n for n in names if columns.count(lookup[n]) > 1)
            raise ConversionError(f"{path}: unit {dup!r} is listed twice")
    else:
        columns = list(range(len(units)))

    def full_rows(rows, what: str) -> np.ndarray:
        """Rows over the listed units -> rows over all units (unlisted units are always kept)."""
        if not isinstance(rows, list) or not rows or not all(isinstance(r, list) for r in rows):
            raise ConversionError(f"{path}: '{what}' must be a non-empty list of lists of 0/1")
        lengths = {len(r) for r in rows}
        if lengths != {len(columns)}:
            raise ConversionError(f"{path}: every row of '{what}' must have {len(columns)} entries (one per "
                                  f"{'listed ' if 'units' in doc else ''}unit), found lengths {sorted(lengths)}")
        if not all(isinstance(v, (int, float)) for r in rows for v in r):   # true/false count as 1/0
            raise ConversionError(f"{path}: '{what}' must hold only the numbers 0 and 1")
        values = np.array(rows, dtype=np.float64)
        keep = np.ones((len(rows), len(units)), dtype=bool)
        keep[:, columns] = _check_values_01(values, f"{path}: {what}")
        return keep

    if "timestep_masks" in doc:
        if "experts" in doc or "timestep_expert" in doc:
            raise ConversionError(f"{path}: give either 'timestep_masks' or 'experts' (+ 'timestep_expert'), "
                                  "not both")
        rows = full_rows(doc["timestep_masks"], "timestep_masks")
        if rows.shape[0] != N_TIMESTEPS:
            raise ConversionError(f"{path}: 'timestep_masks' needs one row per timestep ({N_TIMESTEPS}), found "
                                  f"{rows.shape[0]}")
        routing = routing_from_timestep_masks(rows, units, f"json:{path.name}", semantics)
        return routing
    if "experts" not in doc:
        raise ConversionError(f"{path}: no 'experts' (nor 'timestep_masks') in the mask file")
    masks = full_rows(doc["experts"], "experts")
    if "timestep_expert" in doc:
        table = doc["timestep_expert"]
        if not isinstance(table, list) or len(table) != N_TIMESTEPS or not all(
                isinstance(v, int) and not isinstance(v, bool) for v in table):
            raise ConversionError(f"{path}: 'timestep_expert' must be a list of {N_TIMESTEPS} integers (the expert "
                                  "of each training timestep 0..999)")
        table = np.array(table, dtype=np.int64)
        if table.min() < 0 or table.max() >= masks.shape[0]:
            bad = int(table[(table < 0) | (table >= masks.shape[0])][0])
            raise ConversionError(f"{path}: 'timestep_expert' refers to expert {bad}, but there are "
                                  f"{masks.shape[0]} experts (0..{masks.shape[0] - 1})")
    elif masks.shape[0] == 1:
        table = np.zeros(N_TIMESTEPS, dtype=np.int64)   # one static mask for every timestep
    else:
        raise ConversionError(f"{path}: {masks.shape[0]} experts but no 'timestep_expert' table")
    return AlterRouting([u.name for u in units], [u.kind for u in units], masks, table, semantics,
                        f"json:{path.name}")


# ---- convert: find the masks, check them against the tensors, write the metadata -----------------

def _folder_unet_config(folder: Path) -> dict | None:
    cfg = folder / "unet" / "config.json"
    if not cfg.is_file():
        return None
    try:
        return json.loads(cfg.read_text())
    except json.JSONDecodeError as e:
        raise ConversionError(f"{cfg}: not valid JSON ({e})") from None


def is_alter_config(config: dict | None) -> bool:
    if not config:
        return False
    names = [config.get("_class_name", ""), config.get("mid_block_type", "")]
    names += list(config.get("down_block_types", [])) + list(config.get("up_block_types", []))
    return any(isinstance(n, str) and n.endswith("Pruned") for n in names)


def find_routing(src: str | os.PathLike, family: str, masks_file: str | os.PathLike | None = None
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


def attach_routing(src: str | os.PathLike, tensors: list[TensorSource], family: str,
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


def routing_metadata(routing: AlterRouting) -> dict[str, object]:
    """The GGUF key/values of a routing (keys.ALTER_*)."""
    _validate(routing)
    return {
        keys.ALTER_VERSION: ALTER_FORMAT_VERSION,
        keys.ALTER_UNITS: list(routing.units),
        keys.ALTER_UNIT_KINDS: list(routing.kinds),
        keys.ALTER_N_EXPERTS: routing.n_experts,
        keys.ALTER_EXPERT_MASKS: np.ascontiguousarray(routing.masks, dtype=np.uint8).reshape(-1),
        keys.ALTER_TIMESTEP_EXPERT: np.asarray(routing.table, dtype=np.uint32),
        keys.ALTER_SKIP_SEMANTICS: routing.semantics,
        keys.ALTER_MASK_SOURCE: routing.source,
        keys.ALTER_DROPPED_UNITS: list(routing.dropped),
    }


def _validate(r: AlterRouting) -> None:
    u = len(r.units)
    if len(r.kinds) != u or any(k not in UNIT_KINDS for k in r.kinds):
        raise ConversionError(f"ALTER routing: {len(r.kinds)} unit kinds for {u} units, or a kind not in {UNIT_KINDS}")
    if r.masks.ndim != 2 or r.masks.shape[1] != u or r.masks.shape[0] < 1:
        raise ConversionError(f"ALTER routing: expert masks of shape {list(r.masks.shape)}, expected [E>=1, {u}]")
    if r.table.shape != (N_TIMESTEPS,) or r.table.min() < 0 or r.table.max() >= r.masks.shape[0]:
        raise ConversionError(f"ALTER routing: the timestep table must hold {N_TIMESTEPS} expert indices "
                              f"in 0..{r.masks.shape[0] - 1}")
    if r.semantics not in SKIP_SEMANTICS:
        raise ConversionError(f"ALTER routing: skip semantics {r.semantics!r} not in {SKIP_SEMANTICS}")
    if set(r.dropped) - set(r.units):
        raise ConversionError("ALTER routing: a dropped unit is not a unit")


# ---- read back -----------------------------------------------------------------------------------

def read_alter(metadata: dict) -> AlterRouting | None:
    """The routing stored in a GGUF's metadata (as pysdcpp.modelfile reads it); None without ALTER keys.

    Arrays may be lists or numpy arrays. Raises ConversionError for incomplete or inconsistent metadata.
    """
    if keys.ALTER_VERSION not in metadata:
        if any(str(k).startswith("pysdcpp.alter.") for k in metadata):
            raise ConversionError(f"ALTER metadata without {keys.ALTER_VERSION}")
        return None
    version = metadata[keys.ALTER_VERSION]
    if version != ALTER_FORMAT_VERSION:
        raise ConversionError(f"ALTER metadata version {version!r}; this pysdcpp reads version {ALTER_FORMAT_VERSION}")
    need = (keys.ALTER_UNITS, keys.ALTER_UNIT_KINDS, keys.ALTER_N_EXPERTS, keys.ALTER_EXPERT_MASKS,
            keys.ALTER_TIMESTEP_EXPERT)
    missing = [k for k in need if k not in metadata]
    if missing:
        raise ConversionError(f"ALTER metadata incomplete: no {', '.join(missing)}")
    units = [str(u) for u in metadata[keys.ALTER_UNITS]]
    kinds = [str(k) for k in metadata[keys.ALTER_UNIT_KINDS]]
    n_experts = int(metadata[keys.ALTER_N_EXPERTS])
    flat = np.asarray(metadata[keys.ALTER_EXPERT_MASKS]).reshape(-1)
    if flat.size != n_experts * len(units) or not np.all((flat == 0) | (flat == 1)):
        raise ConversionError(f"ALTER metadata: expert_masks has {flat.size} entries, expected "
                              f"{n_experts} x {len(units)} values of 0/1")
    routing = AlterRouting(
        units, kinds, flat.astype(bool).reshape(n_experts, len(units)),
        np.asarray(metadata[keys.ALTER_TIMESTEP_EXPERT], dtype=np.int64).reshape(-1),
        str(metadata.get(keys.ALTER_SKIP_SEMANTICS, "reference")), str(metadata.get(keys.ALTER_MASK_SOURCE, "")),
        [str(d) for d in metadata.get(keys.ALTER_DROPPED_UNITS, []) or []])
    _validate(routing)
    return routing


# ---- MAC accounting ------------------------------------------------------------------------------

@dataclass
class UnetMacs:
    """Multiply-accumulates of one UNet evaluation: convolutions, linear layers and the two attention matmuls
    (Q K^T and P V). Norms, activations, softmax and additions are not counted."""

    dense: int
    units: list[str]
    unit_macs: list[int]
    latent_h: int
    latent_w: int
    batch: int

    @property
    def per_unit(self) -> dict[str, int]:
        return dict(zip(self.units, self.unit_macs))

    def with_mask(self, keep: Sequence[bool]) -> int:
        """MACs with the units where `keep` is False skipped (dense minus their MACs)."""
        keep = np.asarray(keep, dtype=bool)
        if keep.shape != (len(self.units),):
            raise ValueError(f"keep mask has {keep.size} entries, expected {len(self.units)}")
        return self.dense - int(sum(m for m, k in zip(self.unit_macs, keep) if not k))

    def experts(self, routing: AlterRouting) -> list[int]:
        if routing.units != self.units:
            raise ValueError("the routing's units are not this UNet's prunable units")
        return [self.with_mask(m) for m in routing.masks]


def _conv_out(size: int) -> int:
    return (size - 1) // 2 + 1   # 3x3 conv, stride 2, padding 1


def unet_macs(family_or_config: str | dict, latent_h: int, latent_w: int, batch: int = 1,
              context_len: int = 77) -> UnetMacs:
    """Dense and per-unit MACs of one UNet evaluation on a latent_h x latent_w latent (section 4)."""
    cfg = unet_config(family_or_config)
    boc, lpb, ctx = cfg["block_out_channels"], cfg["layers_per_block"], cfg["cross_attention_dim"]
    tl = _transformer_layers(cfg)
    n = len(boc)
    temb = 4 * boc[0]
    res = [(latent_h, latent_w)]
    for _ in range(n - 1):
        h, w = res[-1]
        res.append((_conv_out(h), _conv_out(w)))

    def resnet(cin, cout, hw):
        return 9 * cin * cout * hw + temb * cout + 9 * cout * cout * hw + (cin * cout * hw if cin != cout else 0)

    def tblock(c, hw):
        self_attn = 4 * c * c * hw + 2 * hw * hw * c
        cross = 2 * c * c * hw + 2 * ctx * c * context_len + 2 * hw * context_len * c
        return self_attn + cross + 12 * c * c * hw   # GEGLU feed-forward: c -> 8c, 4c -> c

    def attention_outer(c, hw):
        return 2 * c * c * hw   # proj_in + proj_out (1x1 conv or linear: the same MACs)

    per_unit: dict[str, int] = {}
    other = boc[0] * temb + temb * temb + 9 * cfg["in_channels"] * boc[0] * latent_h * latent_w
    other += 9 * boc[0] * cfg["out_channels"] * latent_h * latent_w

    def add(name, macs, prunable):
        nonlocal other
        if prunable:
            per_unit[name] = macs
        else:
            other += macs

    unit_names = {u.name for u in prunable_units(cfg)}
    for i, btype in enumerate(cfg["down_block_types"]):
        cin, cout = (boc[i - 1] if i else boc[0]), boc[i]
        hw = res[i][0] * res[i][1]
        for j in range(lpb):
            slot = i * (lpb + 1) + j + 1
            name = f"input_blocks.{slot}.0"
            add(name, resnet(cin if j == 0 else cout, cout, hw), name in unit_names)
            if btype.startswith("CrossAttn"):
                other += attention_outer(cout, hw)
                for k in range(tl[i]):
                    name = f"input_blocks.{slot}.1.transformer_blocks.{k}"
                    add(name, tblock(cout, hw), name in unit_names)
        if i < n - 1:
            other += 9 * cout * cout * res[i + 1][0] * res[i + 1][1]
    c, hw = boc[-1], res[-1][0] * res[-1][1]
    add("middle_block.0", resnet(c, c, hw), True)
    other += attention_outer(c, hw)
    for k in range(tl[-1]):
        add(f"middle_block.1.transformer_blocks.{k}", tblock(c, hw), True)
    add("middle_block.2", resnet(c, c, hw), True)
    rev, rev_tl = list(reversed(boc)), list(reversed(tl))
    for i, btype in enumerate(cfg["up_block_types"]):
        prev, cout = (rev[i - 1] if i else rev[0]), rev[i]
        skip_in = rev[min(i + 1, n - 1)]
        h, w = res[n - 1 - i]
        for j in range(lpb + 1):
            slot = i * (lpb + 1) + j
            skip = skip_in if j == lpb else cout
            name = f"output_blocks.{slot}.0"
            add(name, resnet((prev if j == 0 else cout) + skip, cout, h * w), name in unit_names)
            if btype.startswith("CrossAttn"):
                other += attention_outer(cout, h * w)
                for k in range(rev_tl[i]):
                    name = f"output_blocks.{slot}.1.transformer_blocks.{k}"
                    add(name, tblock(cout, h * w), name in unit_names)
        if i < n - 1:
            uh, uw = res[n - 2 - i]   # the upsampled size is the next skip's size
            other += 9 * cout * cout * uh * uw
    units = prunable_units(cfg)
    unit_macs = [batch * per_unit[u.name] for u in units]
    dense = batch * (other + sum(per_unit.values()))
    return UnetMacs(dense, [u.name for u in units], unit_macs, latent_h, latent_w, batch)
